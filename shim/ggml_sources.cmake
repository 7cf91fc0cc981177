# The ggml backend's sources (libggml-apex.so), for shim/CMakeLists.txt and
# tests/fuzz (fuzz_ggml builds them against the core). Absolute paths.
set(APEX_GGML_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/ggml_apex.c
  ${CMAKE_CURRENT_LIST_DIR}/ggml_apex_ops.c
  ${CMAKE_CURRENT_LIST_DIR}/ggml_apex_buffer.c
  ${CMAKE_CURRENT_LIST_DIR}/ggml_apex_stats.c
  ${CMAKE_CURRENT_LIST_DIR}/ggml_apex_tier.c
  ${CMAKE_CURRENT_LIST_DIR}/ggml_apex_trace.c
  ${CMAKE_CURRENT_LIST_DIR}/ggml_apex_metrics.c)
