# apex-sweep-predict: the performance model's prediction for the hybrid sweep
# (tests/sweep/sweep.py; tests/gpu/run_llama_hybrid.sh on a GPU).
add_executable(apex-sweep-predict ${CMAKE_SOURCE_DIR}/tests/sweep/sweep_predict.c)
target_link_libraries(apex-sweep-predict PRIVATE apex_core)
