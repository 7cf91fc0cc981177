apex_unit_test(test_device_emulated unit/test_device_emulated.c)
apex_unit_test(test_executor unit/test_executor.c)
