# Unit tests of the llama.cpp integration's pieces that build without llama.cpp.
# Included from tests/CMakeLists.txt (after apex_unit_test is defined).
apex_unit_test(test_cpu_attn_strided ${CMAKE_CURRENT_LIST_DIR}/test_cpu_attn_strided.c)
# apex_strided.h, the ABI the ggml backend is a client of.
apex_unit_test(test_strided_api ${CMAKE_CURRENT_LIST_DIR}/test_strided_api.c)
