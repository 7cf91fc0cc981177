# apex-bench vs-vllm: runs bench/vs_vllm.py with the vLLM venv's python and
# this build's libapex.so (the script loads it with ctypes).
target_sources(apex-bench PRIVATE ${CMAKE_CURRENT_LIST_DIR}/bench_vs_vllm.c)
target_compile_definitions(apex-bench PRIVATE APEX_SOURCE_DIR="${CMAKE_SOURCE_DIR}"
  APEX_LIB_PATH="$<TARGET_FILE:apex>")
add_dependencies(apex-bench apex)
