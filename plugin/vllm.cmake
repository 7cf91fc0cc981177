# The vLLM integration's C parts. Included from plugin/CMakeLists.txt.
#  - the engine-managed block-table entry points (apex_paged.h), part of
#    libapex.so and of the core the tests link;
#  - the torch-op shim (shim/torch), when a torch is installed.
target_sources(apex_core PRIVATE ${CMAKE_CURRENT_LIST_DIR}/src/apex_paged_api.c)
include(${CMAKE_CURRENT_LIST_DIR}/../shim/torch/torch.cmake)
