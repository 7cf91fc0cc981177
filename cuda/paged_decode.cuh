// paged_decode.cuh - the flash-decoding kernel template, instantiated once
// per KV type in paged_decode_{f16,bf16,f32}.cu so that nvcc compiles the
// three families in parallel.
//
// One thread block per (sequence, kv head, group of <= GQ q heads, split).
// All q heads of the group share each K/V row, so the block reads its slice
// of the KV cache from HBM exactly once. A token row is read by TX lanes with
// 16-byte loads (TX = D/8 for fp16/bf16 rounded up to a power of two, extra
// lanes idle); a warp therefore covers 32/TX tokens at a time. Each lane
// group keeps its own online-softmax state in registers, merged at the end by
// warp shuffles and then across the four warps in shared memory. Logits are
// kept in the log2 domain (the scale folds log2(e)) so each exp is one exp2.
#ifndef APEX_PAGED_DECODE_CUH
#define APEX_PAGED_DECODE_CUH

#include "cuda/cuda_common.cuh"

namespace apexcu {

struct decode_params {
    const void *q;
    void *out;
    const int32_t *seq_lens;
    const int32_t *block_table;
    const char *kv;
    float *part_o;   // [n_seqs * n_q_heads][n_splits][D] when n_splits > 1
    float *part_lse; // [n_seqs * n_q_heads][n_splits], log2 domain
    size_t block_bytes;
    size_t v_offset; // bytes from a block's K to its V
    int32_t bt_stride;
    int32_t n_q_heads;
    int32_t group;       // q heads per kv head
    int32_t head_chunks; // ceil(group / GQ)
    int32_t bt_shift;    // log2(block_tokens)
    int32_t q_dtype;
    int32_t out_dtype;
    int32_t window;
    int32_t chunk;       // tokens per split
    int32_t n_splits;
    float q_scale;       // scale, times log2(e) when softcap is off
    float softcap;
    float softcap_inv;   // 1 / (scale-free) softcap
};

static const int kDecodeThreads = 128;
static const float kLog2e = 1.4426950408889634f;

template <typename KV, int D, int GQ>
__global__ void __launch_bounds__(kDecodeThreads)
paged_decode_kernel(const decode_params p) {
    typedef vec16<KV> V16;
    constexpr int EPL = V16::n;                        // elements per 16 B
    constexpr int LOADS = (D / EPL > 32) ? 2 : 1;      // 16 B loads per lane
    constexpr int VEC = EPL * LOADS;                   // elements per lane
    constexpr int NCH = D / VEC;                       // lanes per row used
    constexpr int TX = pow2_ceil(NCH);                 // lanes per row
    constexpr int TY = 32 / TX;                        // rows per warp step
    constexpr int NW = kDecodeThreads / 32;
    constexpr int SLOTS = NW * TY;                     // rows per block step
    constexpr int U = 2;                               // steps in flight
    static_assert(D % VEC == 0 && TX <= 32, "head_dim not supported");

    const int seq = blockIdx.y;
    const int split = blockIdx.z;
    const int kvh = blockIdx.x / p.head_chunks;
    const int hc = blockIdx.x - kvh * p.head_chunks;
    const int len = p.seq_lens[seq];
    const int start = p.window > 0 ? max(0, len - p.window) : 0;
    const int t0 = start + split * p.chunk;
    const int t1 = len - t0 <= p.chunk ? len : t0 + p.chunk; // chunk may be INT_MAX
    if (t0 >= t1) return; // this split is past the sequence's end

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int gx = lane % TX;
    const int slot = warp * TY + lane / TX;
    const bool active = gx < NCH;
    const int d0 = gx * VEC;

    float qr[GQ][VEC];
#pragma unroll
    for (int g = 0; g < GQ; g++) {
        const int hg = hc * GQ + g;
        const bool ok = active && hg < p.group;
        const size_t row = (size_t)seq * p.n_q_heads + (size_t)kvh * p.group + hg;
#pragma unroll
        for (int i = 0; i < VEC; i++)
            qr[g][i] = ok ? load_any(p.q, p.q_dtype, row * D + d0 + i) * p.q_scale : 0.0f;
    }

    float m[GQ], l[GQ], acc[GQ][VEC];
#pragma unroll
    for (int g = 0; g < GQ; g++) {
        m[g] = neg_inf();
        l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < VEC; i++) acc[g][i] = 0.0f;
    }

    const int32_t *btab = p.block_table + (size_t)seq * p.bt_stride;
    const int bt_mask = (1 << p.bt_shift) - 1;
    const char *head_base =
        p.kv + (((size_t)kvh << p.bt_shift) * D + d0) * KV::size;

    for (int base = t0; base < t1; base += SLOTS * U) {
        uint4 kr[U][LOADS], vr[U][LOADS];
        bool valid[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int tok = base + u * SLOTS + slot;
            valid[u] = tok < t1;
            if (valid[u] && active) {
                const int blk = __ldg(btab + (tok >> p.bt_shift));
                const char *kp = head_base + (size_t)blk * p.block_bytes +
                                 (size_t)(tok & bt_mask) * D * KV::size;
#pragma unroll
                for (int j = 0; j < LOADS; j++) {
                    kr[u][j] = ld_stream(kp + 16 * j);
                    vr[u][j] = ld_stream(kp + p.v_offset + 16 * j);
                }
            } else {
#pragma unroll
                for (int j = 0; j < LOADS; j++) {
                    kr[u][j] = make_uint4(0, 0, 0, 0);
                    vr[u][j] = make_uint4(0, 0, 0, 0);
                }
            }
        }

        float s[U][GQ];
#pragma unroll
        for (int u = 0; u < U; u++) {
            float kf[VEC];
#pragma unroll
            for (int j = 0; j < LOADS; j++) V16::unpack(kr[u][j], kf + j * EPL);
#pragma unroll
            for (int g = 0; g < GQ; g++) {
                float d = 0.0f;
#pragma unroll
                for (int i = 0; i < VEC; i++) d = fmaf(qr[g][i], kf[i], d);
#pragma unroll
                for (int off = TX / 2; off > 0; off >>= 1)
                    d += __shfl_xor_sync(0xffffffffu, d, off);
                if (p.softcap > 0.0f) d = p.softcap * tanhf(d * p.softcap_inv) * kLog2e;
                s[u][g] = valid[u] ? d : neg_inf();
            }
        }

        float vf[U][VEC];
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int j = 0; j < LOADS; j++) V16::unpack(vr[u][j], vf[u] + j * EPL);

#pragma unroll
        for (int g = 0; g < GQ; g++) {
            float mx = m[g];
#pragma unroll
            for (int u = 0; u < U; u++) mx = fmaxf(mx, s[u][g]);
            const float alpha = exp2_diff(m[g], mx);
            float pu[U];
            float psum = 0.0f;
#pragma unroll
            for (int u = 0; u < U; u++) {
                pu[u] = exp2_diff(s[u][g], mx);
                psum += pu[u];
            }
            l[g] = l[g] * alpha + psum;
#pragma unroll
            for (int i = 0; i < VEC; i++) {
                float a = acc[g][i] * alpha;
#pragma unroll
                for (int u = 0; u < U; u++) a = fmaf(pu[u], vf[u][i], a);
                acc[g][i] = a;
            }
            m[g] = mx;
        }
    }

    // Merge the TY lane groups of each warp.
#pragma unroll
    for (int off = TX; off < 32; off <<= 1) {
#pragma unroll
        for (int g = 0; g < GQ; g++) {
            const float mo = __shfl_xor_sync(0xffffffffu, m[g], off);
            const float lo = __shfl_xor_sync(0xffffffffu, l[g], off);
            const float mx = fmaxf(m[g], mo);
            const float a = exp2_diff(m[g], mx);
            const float b = exp2_diff(mo, mx);
            l[g] = l[g] * a + lo * b;
#pragma unroll
            for (int i = 0; i < VEC; i++) {
                const float ao = __shfl_xor_sync(0xffffffffu, acc[g][i], off);
                acc[g][i] = acc[g][i] * a + ao * b;
            }
            m[g] = mx;
        }
    }

    // Merge the warps, one q head at a time (keeps shared memory at 4 KB).
    __shared__ float s_acc[NW][D];
    __shared__ float s_m[NW], s_l[NW];
#pragma unroll
    for (int g = 0; g < GQ; g++) {
        const int hg = hc * GQ + g;
        if (hg >= p.group) break; // uniform across the block
        if (lane < TX) {
            if (active) {
#pragma unroll
                for (int i = 0; i < VEC; i++) s_acc[warp][d0 + i] = acc[g][i];
            }
            if (lane == 0) {
                s_m[warp] = m[g];
                s_l[warp] = l[g];
            }
        }
        __syncthreads();
        float mx = s_m[0];
#pragma unroll
        for (int w = 1; w < NW; w++) mx = fmaxf(mx, s_m[w]);
        float wt[NW], lsum = 0.0f;
#pragma unroll
        for (int w = 0; w < NW; w++) {
            wt[w] = exp2_diff(s_m[w], mx);
            lsum += s_l[w] * wt[w];
        }
        const float inv = 1.0f / lsum;
        const size_t row = (size_t)seq * p.n_q_heads + (size_t)kvh * p.group + hg;
        for (int d = threadIdx.x; d < D; d += kDecodeThreads) {
            float o = 0.0f;
#pragma unroll
            for (int w = 0; w < NW; w++) o = fmaf(s_acc[w][d], wt[w], o);
            o *= inv;
            if (p.n_splits == 1)
                store_any(p.out, p.out_dtype, row * D + d, o);
            else
                p.part_o[(row * p.n_splits + split) * D + d] = o;
        }
        if (p.n_splits > 1 && threadIdx.x == 0)
            p.part_lse[row * p.n_splits + split] = mx + log2f(lsum);
        __syncthreads();
    }
}

// Launches the kernel for head_dim D and heads-per-block gq of type KV:
// one instantiation per supported head_dim (APEX_HEAD_DIMS) and gq.
template <typename KV>
static int launch_decode_typed(const decode_params &p, int head_dim, int gq,
                               dim3 grid, cudaStream_t stream) {
#define APEXCU_DECODE_CASE(DD, GG)                                              \
    if (head_dim == DD && gq == GG) {                                           \
        paged_decode_kernel<KV, DD, GG><<<grid, kDecodeThreads, 0, stream>>>(p); \
        return apexcu_last_launch_error();                                      \
    }
#define APEXCU_DECODE_D(DD)                                                     \
    APEXCU_DECODE_CASE(DD, 1) APEXCU_DECODE_CASE(DD, 2)                         \
    APEXCU_DECODE_CASE(DD, 4) APEXCU_DECODE_CASE(DD, 8)
    APEX_HEAD_DIMS(APEXCU_DECODE_D)
#undef APEXCU_DECODE_D
#undef APEXCU_DECODE_CASE
    return APEX_CUDA_EUNSUPPORTED;
}

}  // namespace apexcu

// The decode launch for KV type KV: explicitly instantiated once per row
// of APEX_DTYPES, each in its own file (paged_decode_<tag>.cu) so that the
// kernels of the dtypes compile in parallel; declared extern here so no
// other file instantiates them again.
template <typename KV>
int apexcu_decode_launch(const apexcu::decode_params &p, int head_dim, int gq, dim3 grid,
                         cudaStream_t stream) {
    return apexcu::launch_decode_typed<KV>(p, head_dim, gq, grid, stream);
}
#define APEXCU_DECODE_EXTERN_(E, TAG, ...)                                      \
    extern template int apexcu_decode_launch<apexcu::TAG##_t>(                  \
        const apexcu::decode_params &, int, int, dim3, cudaStream_t);
APEX_DTYPES(APEXCU_DECODE_EXTERN_, _)
#undef APEXCU_DECODE_EXTERN_

#endif
