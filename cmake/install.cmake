# cmake --install BUILD --prefix P:
#   lib/libapex.so.1 (+ libapex.so), include/apex/*.h, bin/apex-bench, bin/apex-sim,
#   lib/cmake/apex/ (find_package(apex) -> apex::apex), lib/pkgconfig/apex.pc,
#   and, when the build has the llama.cpp adapter (-DLLAMA_CPP_SRC=... -DLLAMA_CPP_BUILD=...),
#   lib/apex/libggml-apex.so and lib/apex/libapex-preload.so (shim/CMakeLists.txt).
# Not in a pip build (SKBUILD), which installs into the vLLM package instead.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS apex EXPORT apexTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY ${CMAKE_SOURCE_DIR}/plugin/include/apex DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(TARGETS apex-bench RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
if(TARGET apex-sim)
  install(TARGETS apex-sim RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
endif()

set(_cfgdir ${CMAKE_INSTALL_LIBDIR}/cmake/apex)
install(EXPORT apexTargets NAMESPACE apex:: DESTINATION ${_cfgdir})
configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/apexConfig.cmake.in
  ${CMAKE_BINARY_DIR}/apexConfig.cmake INSTALL_DESTINATION ${_cfgdir})
write_basic_package_version_file(${CMAKE_BINARY_DIR}/apexConfigVersion.cmake
  COMPATIBILITY SameMajorVersion)
install(FILES ${CMAKE_BINARY_DIR}/apexConfig.cmake ${CMAKE_BINARY_DIR}/apexConfigVersion.cmake
  DESTINATION ${_cfgdir})

# Relocatable: prefix is found from the .pc file's own place.
configure_file(${CMAKE_CURRENT_LIST_DIR}/apex.pc.in ${CMAKE_BINARY_DIR}/apex.pc @ONLY)
install(FILES ${CMAKE_BINARY_DIR}/apex.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
