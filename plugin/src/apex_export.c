/* apex_export.c - the translation unit of libapex.so itself. The exported
 * functions live in the core (linked whole); this file holds the version
 * entry points so the shared object always has at least its identity. */
#include "apex/apex.h"

APEX_API int apex_abi_version(void) { return APEX_ABI_VERSION; }
APEX_API const char *apex_version(void) { return APEX_VERSION_STRING; }
