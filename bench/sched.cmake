# Scheduler benchmark (apex-bench sched) and the serving simulator (apex-sim).
target_sources(apex-bench PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/bench_sched.c)

add_executable(apex-sim
  ${CMAKE_CURRENT_SOURCE_DIR}/sim/sim_main.c
  ${CMAKE_CURRENT_SOURCE_DIR}/sim/sim.c
  ${CMAKE_CURRENT_SOURCE_DIR}/sim/workload.c
  ${CMAKE_CURRENT_SOURCE_DIR}/sim/policies.c
  ${CMAKE_CURRENT_SOURCE_DIR}/sim/neo.c
  ${CMAKE_CURRENT_SOURCE_DIR}/sim/exec.c)
target_link_libraries(apex-sim PRIVATE apex_core)
target_include_directories(apex-sim PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/sim)
