# Scheduler, performance model, profile and profiler (issue 4).
target_sources(apex_core PRIVATE
  ${CMAKE_CURRENT_SOURCE_DIR}/sched/json.c
  ${CMAKE_CURRENT_SOURCE_DIR}/sched/profile.c
  ${CMAKE_CURRENT_SOURCE_DIR}/sched/presets.c
  ${CMAKE_CURRENT_SOURCE_DIR}/sched/model.c
  ${CMAKE_CURRENT_SOURCE_DIR}/sched/sched.c
  ${CMAKE_CURRENT_SOURCE_DIR}/sched/profiler.c)
