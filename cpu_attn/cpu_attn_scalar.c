/* Portable inner kernel: the same span structure as the SIMD variants (a
 * group of tokens scored, one online-softmax update, then P*V), in plain C
 * for CPUs without AVX2. */
#include <math.h>
#include <string.h>

#include "cpu_attn/cpu_attn_impl.h"
#include "cpu_attn/dtype_convert.h"

static void load_row(float *dst, const uint8_t *src, apex_dtype dt, int32_t n) {
    APEX_DISPATCH_KV_DTYPE(dt, T, {
        const T *x = (const T *)src;
        for (int32_t i = 0; i < n; i++) dst[i] = T_to_f32(x[i]);
    });
}

static void span_scalar(const cpu_attn_span *s, float *m, float *l, float *acc, float *scratch) {
    const int32_t G = s->NH * s->G, D = s->D, bt = s->bt, g = s->G;
    const size_t esz = apex_dtype_size(s->kv_dtype), row_bytes = (size_t)D * esz;
    const int32_t gt = bt > CPU_ATTN_GROUP_TOKENS ? bt : CPU_ATTN_GROUP_TOKENS;
    float *sc = scratch;                          /* [NH*G][SROW] scores     */
    float *row = scratch + (size_t)G * CPU_ATTN_SROW; /* one K or V row in fp32 */
    for (int32_t h = 0; h < G; h++) m[h] = -INFINITY, l[h] = 0.0f;
    memset(acc, 0, (size_t)G * (size_t)D * sizeof(float));

    for (int32_t gs = s->t0; gs < s->t1;) {
        const int32_t ge = (gs / gt + 1) * gt < s->t1 ? (gs / gt + 1) * gt : s->t1;
        const int32_t n = ge - gs;
        for (int32_t t = gs; t < ge; t++) {
            const uint8_t *blk = s->kv + (size_t)s->blocks[t / bt] * s->block_bytes;
            for (int32_t h = 0; h < G; h++) {
                if (h % g == 0)
                    load_row(row, blk + s->k_off + (size_t)(h / g) * s->panel + (size_t)(t % bt) * row_bytes,
                             s->kv_dtype, D);
                const float *q = s->q + (size_t)h * D;
                float dot = 0.0f;
                for (int32_t d = 0; d < D; d++) dot += q[d] * row[d];
                if (s->softcap > 0.0f) dot = s->softcap * tanhf(dot / s->softcap);
                sc[(size_t)h * CPU_ATTN_SROW + (size_t)(t - gs)] = dot;
            }
        }
        for (int32_t h = 0; h < G; h++) {
            float *p = sc + (size_t)h * CPU_ATTN_SROW;
            float mx = m[h];
            for (int32_t j = 0; j < n; j++) mx = p[j] > mx ? p[j] : mx;
            if (mx > m[h]) {
                /* The running max grew: rescale what was summed so far. */
                float alpha = m[h] == -INFINITY ? 0.0f : expf(m[h] - mx);
                l[h] *= alpha;
                for (int32_t d = 0; d < D; d++) acc[(size_t)h * D + d] *= alpha;
                m[h] = mx;
            }
            float sum = 0.0f;
            for (int32_t j = 0; j < n; j++) sum += (p[j] = expf(p[j] - mx));
            l[h] += sum;
        }
        for (int32_t t = gs; t < ge; t++) {
            const uint8_t *blk = s->kv + (size_t)s->blocks[t / bt] * s->block_bytes;
            for (int32_t h = 0; h < G; h++) {
                if (h % g == 0)
                    load_row(row, blk + s->v_off + (size_t)(h / g) * s->panel + (size_t)(t % bt) * row_bytes,
                             s->kv_dtype, D);
                const float p = sc[(size_t)h * CPU_ATTN_SROW + (size_t)(t - gs)];
                float *a = acc + (size_t)h * D;
                for (int32_t d = 0; d < D; d++) a[d] += p * row[d];
            }
        }
        gs = ge;
    }
}

static void store_scalar(void *out, apex_dtype dt, const float *src, float mul, int32_t n) {
    for (int32_t i = 0; i < n; i++) apex_store_f32(out, dt, (size_t)i, src[i] * mul);
}

const cpu_attn_kernel cpu_attn_kernel_scalar = {span_scalar, store_scalar, NULL, 0, NULL};
