/* apex_preload.c - libapex-preload.so: LD_PRELOAD it into an unmodified
 * llama.cpp tool and its constructor registers the APEX ggml backend (from
 * libggml-apex.so, a dependency) in ggml's registry before main() runs;
 * llama.cpp then adds the APEX device to every context like any other ACCEL
 * device. */
#include "ggml-backend.h"

ggml_backend_reg_t ggml_apex_reg(void);
int ggml_apex_mark_preloaded(void);

__attribute__((constructor)) static void apex_preload_init(void) {
    if (ggml_apex_mark_preloaded()) ggml_backend_register(ggml_apex_reg());
}
