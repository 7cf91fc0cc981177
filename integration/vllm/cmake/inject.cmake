# Run right after project() (CMAKE_PROJECT_INCLUDE, set by pyproject.toml):
# includes plugin/vllm.cmake once the top-level file has defined its targets.
cmake_language(DEFER DIRECTORY ${CMAKE_SOURCE_DIR}
               CALL include ${CMAKE_SOURCE_DIR}/plugin/vllm.cmake)
