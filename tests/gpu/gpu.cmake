# GPU-tier programs, included by tests/CMakeLists.txt when CUDA is on.
# test_cuda_kernels runs in ctest too: on a machine without a GPU it exits 77
# and ctest reports it skipped, which still proves the binary starts there.
add_executable(test_cuda_kernels ${CMAKE_CURRENT_LIST_DIR}/test_cuda_kernels.c)
target_link_libraries(test_cuda_kernels PRIVATE apex_core)
add_test(NAME test_cuda_kernels COMMAND test_cuda_kernels --quick)
set_tests_properties(test_cuda_kernels PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 600)

add_executable(bench_cuda ${CMAKE_CURRENT_LIST_DIR}/bench_cuda.c)
target_link_libraries(bench_cuda PRIVATE apex_core)
