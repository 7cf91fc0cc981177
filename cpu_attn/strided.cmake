# The strided (token-major, ggml-layout) attention kernel, part of apex_core.
# Included by the build (from the top level or from cpu_attn/); the path is
# absolute so it works from either. No ISA flags: its AVX-512 loop carries a
# target attribute and is chosen at run time.
target_sources(apex_core PRIVATE ${CMAKE_CURRENT_LIST_DIR}/cpu_attn_strided.c)
