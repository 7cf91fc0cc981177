# Scheduler, performance model and profile tests (issue 4).
apex_unit_test(test_sched unit/test_sched.c)
apex_unit_test(test_sched_profile unit/test_sched_profile.c)
