# The vLLM integration's C parts. Included from plugin/CMakeLists.txt (and by
# pip builds through integration/vllm/cmake/inject.cmake; the guard makes a
# second inclusion a no-op).
#  - the engine-managed block-table entry points (apex_paged.h), part of
#    libapex.so and of the core the tests link;
#  - the torch-op shim (shim/torch), when a torch is installed;
#  - in a pip build (SKBUILD), both libraries go into the apex_vllm package.
include_guard(GLOBAL)
target_sources(apex_core PRIVATE ${CMAKE_CURRENT_LIST_DIR}/src/apex_paged_api.c
                                 ${CMAKE_CURRENT_LIST_DIR}/src/apex_paged_copy.c)
include(${CMAKE_CURRENT_LIST_DIR}/../shim/torch/torch.cmake)
if(SKBUILD)
  if(NOT TARGET apex_torch)
    message(FATAL_ERROR "APEX: pip build without torch: install torch first and build with "
                        "--no-build-isolation")
  endif()
  set_target_properties(apex_torch PROPERTIES INSTALL_RPATH "$ORIGIN;${APEX_TORCH_DIR}/lib")
  install(TARGETS apex apex_torch LIBRARY DESTINATION apex_vllm/lib)
endif()
