# apex-bench vs-ggml: APEX's CPU kernels against ggml-cpu's FLASH_ATTN_EXT.
# Optional: built only when APEX_LLAMA_CPP_DIR names a llama.cpp set-up made by
# setup_hooks/fetch_llama_cpp.sh (.../llama.cpp-<version>, with src/ and
# build/). Needs cpu_attn/strided.cmake in apex_core.
set(APEX_LLAMA_CPP_DIR "" CACHE PATH "llama.cpp set-up (src/, build/) for apex-bench vs-ggml")
if(APEX_LLAMA_CPP_DIR)
  set(_vg_src ${APEX_LLAMA_CPP_DIR}/src)
  set(_vg_bin ${APEX_LLAMA_CPP_DIR}/build/bin)
  find_library(APEX_GGML_CPU_LIB ggml-cpu PATHS ${_vg_bin} NO_DEFAULT_PATH)
  find_library(APEX_GGML_BASE_LIB ggml-base PATHS ${_vg_bin} NO_DEFAULT_PATH)
  if(EXISTS ${_vg_src}/ggml/include/ggml-cpu.h AND APEX_GGML_CPU_LIB AND APEX_GGML_BASE_LIB)
    target_sources(apex-bench PRIVATE ${CMAKE_CURRENT_LIST_DIR}/bench_vs_ggml.c)
    target_compile_definitions(apex-bench PRIVATE APEX_BENCH_VS_GGML)
    target_include_directories(apex-bench PRIVATE ${_vg_src}/ggml/include)
    target_link_libraries(apex-bench PRIVATE ${APEX_GGML_CPU_LIB} ${APEX_GGML_BASE_LIB})
    set_property(TARGET apex-bench APPEND PROPERTY BUILD_RPATH ${_vg_bin})
    message(STATUS "APEX: apex-bench vs-ggml against ${APEX_LLAMA_CPP_DIR}")
  else()
    message(WARNING "APEX_LLAMA_CPP_DIR=${APEX_LLAMA_CPP_DIR} has no llama.cpp build; apex-bench vs-ggml not built")
  endif()
endif()
