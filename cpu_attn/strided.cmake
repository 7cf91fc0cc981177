# The strided (token-major, ggml-layout) attention kernel, part of apex_core:
# driver, reference (+ scalar item), fp32 AVX-512 loop, exact mode.
# Included by the build (from the top level or from cpu_attn/); the paths are
# absolute so it works from either. No ISA flags: the AVX-512 loops carry a
# target attribute and are chosen at run time.
set(APEX_STRIDED_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/cpu_attn_strided.c
  ${CMAKE_CURRENT_LIST_DIR}/cpu_attn_strided_reference.c
  ${CMAKE_CURRENT_LIST_DIR}/cpu_attn_strided_avx512.c
  ${CMAKE_CURRENT_LIST_DIR}/cpu_attn_strided_exact.c)
if(TARGET apex_core)
  target_sources(apex_core PRIVATE ${APEX_STRIDED_SOURCES})
endif()
