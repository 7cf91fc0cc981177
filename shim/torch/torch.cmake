# libapex_torch.so: APEX's paged entry points as torch ops (namespace apex),
# registered from C through libtorch's stable C ABI. Built only when a torch
# (>= 2.7) is importable by APEX_TORCH_PYTHON (else the build's
# Python_EXECUTABLE, as pip/scikit-build-core sets it, else python3 on PATH)
# or APEX_TORCH_DIR names its package folder. Included from plugin/vllm.cmake.
set(APEX_TORCH_PYTHON "" CACHE STRING "Python whose torch the torch-op shim is built against")
set(APEX_TORCH_DIR "" CACHE PATH "torch package folder (site-packages/torch)")
if(NOT APEX_TORCH_DIR)
  set(_py ${APEX_TORCH_PYTHON})
  if(NOT _py AND Python_EXECUTABLE)
    set(_py ${Python_EXECUTABLE})
  endif()
  if(NOT _py)
    find_program(_py NAMES python3 python)
  endif()
  if(_py)
    execute_process(COMMAND ${_py} -c "import os, torch; print(os.path.dirname(torch.__file__))"
                    OUTPUT_VARIABLE _dir OUTPUT_STRIP_TRAILING_WHITESPACE
                    RESULT_VARIABLE _rc ERROR_QUIET)
    if(_rc EQUAL 0)
      set(APEX_TORCH_DIR ${_dir} CACHE PATH "" FORCE)
    endif()
  endif()
endif()
if(APEX_TORCH_DIR AND EXISTS ${APEX_TORCH_DIR}/lib/libtorch_cpu.so)
  message(STATUS "APEX: torch-op shim against ${APEX_TORCH_DIR}")
  add_library(apex_torch SHARED ${CMAKE_CURRENT_LIST_DIR}/apex_torch.c)
  target_link_libraries(apex_torch PRIVATE apex ${APEX_TORCH_DIR}/lib/libtorch_cpu.so
                        ${APEX_TORCH_DIR}/lib/libc10.so ${CMAKE_DL_LIBS})
  # libapex.so next to it; libtorch where the build found it.
  set_target_properties(apex_torch PROPERTIES
    BUILD_RPATH "$ORIGIN;${APEX_TORCH_DIR}/lib" INSTALL_RPATH "$ORIGIN;${APEX_TORCH_DIR}/lib")
else()
  message(STATUS "APEX: torch-op shim off (no torch found)")
endif()
