# Unit tests of the vLLM integration's C pieces (apex_paged.h).
# Included from tests/CMakeLists.txt (after apex_unit_test is defined).
apex_unit_test(test_paged_api ${CMAKE_CURRENT_LIST_DIR}/test_paged_api.c)
apex_unit_test(test_paged_copy ${CMAKE_CURRENT_LIST_DIR}/test_paged_copy.c)
apex_unit_test(test_paged_submit ${CMAKE_CURRENT_LIST_DIR}/test_paged_submit.c)
