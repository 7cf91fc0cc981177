/* workload.c - seeded PRNG and request length distributions. */
#include <math.h>
#include <string.h>

#include "sim.h"

void rng_seed(sim_rng *r, uint64_t seed) {
    r->s = seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
    if (!r->s) r->s = 1;
}

static uint64_t rng_u64(sim_rng *r) { /* splitmix64 */
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double rng_uniform(sim_rng *r) { return (double)(rng_u64(r) >> 11) * 0x1.0p-53; }

double rng_exp(sim_rng *r, double rate) { return -log(1.0 - rng_uniform(r)) / rate; }

double rng_normal(sim_rng *r) {
    double u1 = rng_uniform(r), u2 = rng_uniform(r);
    return sqrt(-2.0 * log(1.0 - u1)) * cos(6.283185307179586 * u2);
}

static int32_t uni(sim_rng *r, double lo, double hi) {
    return (int32_t)floor(lo + (hi - lo + 1) * rng_uniform(r));
}

/* neo-synthetic's output scale L (apex-sim --neo-out). */
int32_t g_neo_out = 300;

int workload_lengths(const char *name, sim_rng *r, int32_t *prompt, int32_t *output) {
    if (!strcmp(name, "chat")) {           /* short prompt, medium output */
        *prompt = uni(r, 64, 512);
        *output = uni(r, 128, 512);
    } else if (!strcmp(name, "reasoning")) { /* short prompt, long output */
        *prompt = uni(r, 64, 256);
        *output = uni(r, 512, 2048);
    } else if (!strcmp(name, "summarize")) { /* long prompt, short output */
        *prompt = uni(r, 1024, 3072);
        *output = uni(r, 32, 160);
    } else if (!strcmp(name, "neo-synthetic")) { /* NEO: U[0.9,1.1] x (1000, L) */
        *prompt = (int32_t)lround(1000 * (0.9 + 0.2 * rng_uniform(r)));
        *output = (int32_t)lround(g_neo_out * (0.9 + 0.2 * rng_uniform(r)));
        if (*output < 1) *output = 1;
    } else {
        return -1;
    }
    return 0;
}
