// prefill.cu - causal attention over a packed variable-length batch, plus
// the store of its K/V rows into a block pool.
//
// One thread block per (tile of RPC query rows, kv head, sequence), where a
// "row" is a (token, q head of the group) pair: all q heads of a group share
// the block, so each K/V tile is read once per group. Key tiles of BK rows
// are staged in shared memory as fp32 (K padded to D+1 floats so that lane j
// reading key j is bank-conflict free); each warp owns RW rows; lane j scores
// key j, the warp runs the online softmax, and P.V is accumulated with lanes
// over head_dim. Correct and simple rather than tensor-core fast: prefill is
// a small share of an APEX step.
#include "cuda/cuda_common.cuh"
#include "cuda/kv_append.cuh"

namespace {

struct prefill_params {
    const int32_t *cu;
    const void *q;
    const void *k;
    const void *v;
    void *out;
    int64_t q_stride;
    int64_t k_stride;
    int64_t v_stride;
    int32_t n_q_heads;
    int32_t group;
    int32_t act_dtype;
    int32_t out_dtype;
    int32_t window;
    float q_scale;
    float softcap;
    float softcap_inv;
};

const int kThreads = 128;
const float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

template <int D, int RW, int BK>
__global__ void __launch_bounds__(kThreads) prefill_kernel(const prefill_params p) {
    constexpr int NW = kThreads / 32;
    constexpr int RPC = NW * RW;
    constexpr int NA = (D + 31) / 32;
    __shared__ float sQ[RPC][D];
    __shared__ float sK[BK][D + 1];
    __shared__ float sV[BK][D];

    const int seq = blockIdx.z, kvh = blockIdx.y;
    const int tok0 = p.cu[seq];
    const int n = p.cu[seq + 1] - tok0;
    const int G = p.group;
    const int n_rows = n * G;
    const int row0 = blockIdx.x * RPC;
    if (row0 >= n_rows) return;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    for (int e = tid; e < RPC * D; e += kThreads) {
        const int r = e / D, d = e - r * D, row = row0 + r;
        float x = 0.0f;
        if (row < n_rows) {
            const int i = row / G, hq = kvh * G + (row - i * G);
            x = apexcu::load_any(p.q, p.act_dtype,
                                 (size_t)(tok0 + i) * p.q_stride + (size_t)hq * D + d) * p.q_scale;
        }
        sQ[r][d] = x;
    }
    const int i_lo = row0 / G;
    const int i_hi = min(n_rows - 1, row0 + RPC - 1) / G;
    const int k_lo = p.window > 0 ? max(0, i_lo - p.window + 1) : 0;

    float m[RW], l[RW], acc[RW][NA];
#pragma unroll
    for (int rr = 0; rr < RW; rr++) {
        m[rr] = apexcu::neg_inf();
        l[rr] = 0.0f;
#pragma unroll
        for (int a = 0; a < NA; a++) acc[rr][a] = 0.0f;
    }

    for (int kt = k_lo; kt <= i_hi; kt += BK) {
        __syncthreads(); // the previous tile is consumed (and sQ is written)
        for (int e = tid; e < BK * D; e += kThreads) {
            const int j = e / D, d = e - j * D, key = kt + j;
            float kx = 0.0f, vx = 0.0f;
            if (key <= i_hi) {
                const size_t t = (size_t)(tok0 + key);
                kx = apexcu::load_any(p.k, p.act_dtype, t * p.k_stride + (size_t)kvh * D + d);
                vx = apexcu::load_any(p.v, p.act_dtype, t * p.v_stride + (size_t)kvh * D + d);
            }
            sK[j][d] = kx;
            sV[j][d] = vx;
        }
        __syncthreads();
#pragma unroll
        for (int rr = 0; rr < RW; rr++) {
            const int r = warp * RW + rr, row = row0 + r;
            if (row >= n_rows) continue; // uniform across the warp
            const int i = row / G;
            const int key = kt + lane;
            float s = apexcu::neg_inf();
            if (lane < BK && key <= i && (p.window <= 0 || key > i - p.window)) {
                float dot = 0.0f;
#pragma unroll 8
                for (int d = 0; d < D; d++) dot = fmaf(sQ[r][d], sK[lane][d], dot);
                if (p.softcap > 0.0f) dot = p.softcap * tanhf(dot * p.softcap_inv) * kLog2e;
                s = dot;
            }
            const float mx = fmaxf(m[rr], warp_max(s));
            const float alpha = apexcu::exp2_diff(m[rr], mx);
            const float pj = apexcu::exp2_diff(s, mx);
            l[rr] = l[rr] * alpha + warp_sum(pj);
#pragma unroll
            for (int a = 0; a < NA; a++) acc[rr][a] *= alpha;
#pragma unroll 4
            for (int j = 0; j < BK; j++) {
                const float w = __shfl_sync(0xffffffffu, pj, j);
#pragma unroll
                for (int a = 0; a < NA; a++) {
                    const int d = lane + 32 * a;
                    if (d < D) acc[rr][a] = fmaf(w, sV[j][d], acc[rr][a]);
                }
            }
            m[rr] = mx;
        }
    }

#pragma unroll
    for (int rr = 0; rr < RW; rr++) {
        const int row = row0 + warp * RW + rr;
        if (row >= n_rows) continue;
        const int i = row / G, hq = kvh * G + (row - i * G);
        const float inv = 1.0f / l[rr];
        const size_t o = ((size_t)(tok0 + i) * p.n_q_heads + hq) * D;
#pragma unroll
        for (int a = 0; a < NA; a++) {
            const int d = lane + 32 * a;
            if (d < D) apexcu::store_any(p.out, p.out_dtype, o + d, acc[rr][a] * inv);
        }
    }
}

template <int D, int RW, int BK>
int launch(const prefill_params &p, int n_kv_heads, int n_seqs, int max_rows, cudaStream_t s) {
    constexpr int RPC = (kThreads / 32) * RW;
    const dim3 grid((unsigned)((max_rows + RPC - 1) / RPC), (unsigned)n_kv_heads,
                    (unsigned)n_seqs);
    prefill_kernel<D, RW, BK><<<grid, kThreads, 0, s>>>(p);
    return apexcu_last_launch_error();
}

}  // namespace

extern "C" int apex_cuda_prefill_attention(const apex_cuda_prefill *a, void *stream) {
    if (!a || a->n_seqs < 0 || a->n_tokens < 0 || a->n_q_heads < 1 || a->n_kv_heads < 1 ||
        a->n_q_heads % a->n_kv_heads || a->max_seq_len < 0 || a->q_stride < 0 ||
        a->k_stride < 0 || a->v_stride < 0 || !apex_dtype_valid(a->act_dtype) ||
        !apex_dtype_valid(a->out_dtype))
        return APEX_CUDA_EINVAL;
    const int D = a->head_dim;
    bool d_ok = false;
#define PREFILL_HD_OK(DD) d_ok = d_ok || D == DD;
    APEX_HEAD_DIMS(PREFILL_HD_OK)
#undef PREFILL_HD_OK
    if (!d_ok) return APEX_CUDA_EUNSUPPORTED;
    if (a->n_seqs == 0 || a->n_tokens == 0) return 0;
    if (!a->cu_seqlens || !a->q || !a->k || !a->v || !a->out) return APEX_CUDA_EINVAL;
    if (a->n_seqs > 65535) return APEX_CUDA_EUNSUPPORTED; // grid.z
    cudaStream_t s = (cudaStream_t)stream;

    if (a->kv) {
        apex_cuda_kv_append w;
        w.n_rows = a->n_tokens;
        w.n_kv_heads = a->n_kv_heads;
        w.head_dim = D;
        w.block_tokens = a->block_tokens;
        w.k = a->k;
        w.v = a->v;
        w.k_stride = a->k_stride;
        w.v_stride = a->v_stride;
        w.src_dtype = a->act_dtype;
        w.slots = a->slots;
        w.kv = a->kv;
        w.block_bytes = a->block_bytes;
        w.kv_dtype = a->kv_dtype;
        const int rc = apexcu_kv_append(&w, s);
        if (rc) return rc;
    }

    prefill_params p;
    p.cu = a->cu_seqlens;
    p.q = a->q;
    p.k = a->k;
    p.v = a->v;
    p.out = a->out;
    p.q_stride = a->q_stride ? a->q_stride : (int64_t)a->n_q_heads * D;
    p.k_stride = a->k_stride ? a->k_stride : (int64_t)a->n_kv_heads * D;
    p.v_stride = a->v_stride ? a->v_stride : (int64_t)a->n_kv_heads * D;
    p.n_q_heads = a->n_q_heads;
    p.group = a->n_q_heads / a->n_kv_heads;
    p.act_dtype = a->act_dtype;
    p.out_dtype = a->out_dtype;
    p.window = a->window > 0 ? a->window : 0;
    const bool capped = a->softcap > 0.0f;
    p.q_scale = capped ? a->scale : a->scale * kLog2e;
    p.softcap = capped ? a->softcap : 0.0f;
    p.softcap_inv = capped ? 1.0f / a->softcap : 0.0f;
    const long long rows = (long long)a->max_seq_len * p.group;
    if (rows > 0x7fffffffLL) return APEX_CUDA_EUNSUPPORTED;
    const int max_rows = (int)rows;
    // One instantiation per supported head_dim; above 128, half the rows per
    // warp and keys per tile keep the shared-memory tiles under 48 KiB.
#define PREFILL_LAUNCH(DD)                                                                 \
    if (D == DD)                                                                           \
        return launch<DD, (DD > 128 ? 2 : 4), (DD > 128 ? 16 : 32)>(p, a->n_kv_heads,      \
                                                                   a->n_seqs, max_rows, s);
    APEX_HEAD_DIMS(PREFILL_LAUNCH)
#undef PREFILL_LAUNCH
    return APEX_CUDA_EUNSUPPORTED;
}
