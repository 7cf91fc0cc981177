# The engine-managed block-table entry points (apex_paged.h), part of
# libapex.so and of the core the tests link. Included from plugin/CMakeLists.txt.
target_sources(apex_core PRIVATE ${CMAKE_CURRENT_LIST_DIR}/src/apex_paged_api.c)
