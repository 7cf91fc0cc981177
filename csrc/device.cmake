target_sources(apex_core PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/device_emulated.c)
