// paged_decode.cu - the public decode launcher: argument checks, the split-K
// choice, and the kernel that merges the splits by log-sum-exp.
#include <math.h>

#include "cuda/paged_decode.cuh"

namespace {

const int kMaxSplits = 128;
const int kSplitRows = 1024;   // workspace (seq, split) pairs per q head
const int kMinChunk = 256;     // fewer tokens per split do not pay the merge
const int kBlocksPerSm = 4;    // resident decode blocks an SM keeps busy

int heads_per_block(int group) {
    return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8;
}

int log2_exact(int x) {
    if (x < 1 || (x & (x - 1))) return -1;
    int s = 0;
    while ((1 << s) < x) s++;
    return s;
}

bool head_dim_ok(int d) {
#define APEXCU_HD_(DD) if (d == DD) return true;
    APEX_HEAD_DIMS(APEXCU_HD_)
#undef APEXCU_HD_
    return false;
}

int check_args(const apex_cuda_decode *a) {
    if (!a || a->n_seqs < 0 || a->n_q_heads < 1 || a->n_kv_heads < 1 ||
        a->n_q_heads % a->n_kv_heads || a->block_table_stride < 0 || a->max_seq_len < 0)
        return APEX_CUDA_EINVAL;
    if (!apex_dtype_valid(a->kv_dtype) || !apex_dtype_valid(a->q_dtype) ||
        !apex_dtype_valid(a->out_dtype))
        return APEX_CUDA_EINVAL;
    if (!head_dim_ok(a->head_dim)) return APEX_CUDA_EUNSUPPORTED;
    const int shift = log2_exact(a->block_tokens);
    if (shift < 0 || shift > 8) return APEX_CUDA_EUNSUPPORTED;
    if (a->n_seqs == 0) return 0;
    if (!a->q || !a->out || !a->seq_lens || !a->block_table || !a->kv) return APEX_CUDA_EINVAL;
    const size_t need =
        apex_kv_block_bytes(a->n_kv_heads, a->block_tokens, a->head_dim, a->kv_dtype);
    if (a->block_bytes < need || a->block_bytes % 16 || ((uintptr_t)a->kv & 15))
        return APEX_CUDA_EINVAL;
    if (a->n_seqs > 65535) return APEX_CUDA_EUNSUPPORTED; // grid.y
    return 0;
}

// Splits per (sequence, kv head): enough blocks to fill the GPU when the
// batch alone does not, but never splits shorter than kMinChunk tokens, and
// never more partials than the workspace holds. *chunk gets tokens per split.
int choose_splits(const apex_cuda_decode *a, int *chunk) {
    int max_att = a->max_seq_len;
    if (a->window > 0 && a->window < max_att) max_att = a->window;
    if (max_att < 1) max_att = 1;
    const int group = a->n_q_heads / a->n_kv_heads;
    const int head_chunks = (group + heads_per_block(group) - 1) / heads_per_block(group);
    long long s;
    if (a->num_splits > 0) {
        s = a->num_splits;
    } else {
        // Flash-decoding's wave heuristic: the fewest splits whose last
        // wave of blocks is nearly as full as the best split count gets.
        const long long base = (long long)a->n_seqs * a->n_kv_heads * head_chunks;
        const long long slots = (long long)apexcu_sm_count() * kBlocksPerSm;
        long long top = (max_att + kMinChunk - 1) / kMinChunk;
        if (top > kMaxSplits) top = kMaxSplits;
        s = 1;
        if (base * 5 < slots * 4 && top > 1) {
            double eff[kMaxSplits + 1], best = 0.0;
            for (long long k = 1; k <= top; k++) {
                const double waves = (double)(base * k) / (double)slots;
                eff[k] = waves / ceil(waves);
                if (eff[k] > best) best = eff[k];
            }
            for (s = 1; s < top && eff[s] < 0.85 * best; s++) {
            }
        }
    }
    long long cap = 1;
    if (a->workspace && a->n_seqs > 0) {
        const size_t per = (size_t)a->n_seqs * a->n_q_heads * (a->head_dim + 1) * sizeof(float);
        cap = (long long)(a->workspace_bytes / per);
    }
    if (s > cap) s = cap;
    if (s > kMaxSplits) s = kMaxSplits;
    if (s > max_att) s = max_att;
    if (s < 1) s = 1;
    int c = (int)((max_att + s - 1) / s);
    s = (max_att + c - 1) / c;
    // One split covers any length, even one above max_seq_len.
    *chunk = s == 1 ? 0x7fffffff : c;
    return (int)s;
}

__global__ void decode_merge_kernel(const float *__restrict__ part_o,
                                    const float *__restrict__ part_lse, void *out,
                                    int out_dtype, const int32_t *__restrict__ seq_lens,
                                    int window, int chunk, int n_splits, int n_q_heads,
                                    int head_dim) {
    __shared__ float w[kMaxSplits];
    __shared__ float s_inv;
    const int h = blockIdx.x, seq = blockIdx.y;
    const size_t row = (size_t)seq * n_q_heads + h;
    const int len = seq_lens[seq];
    const int start = window > 0 ? max(0, len - window) : 0;
    const int used = min(n_splits, (len - start + chunk - 1) / chunk);
    if (threadIdx.x < used) w[threadIdx.x] = part_lse[row * n_splits + threadIdx.x];
    __syncthreads();
    if (threadIdx.x == 0) {
        float mx = w[0];
        for (int s = 1; s < used; s++) mx = fmaxf(mx, w[s]);
        float sum = 0.0f;
        for (int s = 0; s < used; s++) {
            w[s] = exp2f(w[s] - mx);
            sum += w[s];
        }
        s_inv = 1.0f / sum;
    }
    __syncthreads();
    const float *po = part_o + row * n_splits * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (int s = 0; s < used; s++) o = fmaf(w[s], po[(size_t)s * head_dim + d], o);
        apexcu::store_any(out, out_dtype, row * head_dim + d, o * s_inv);
    }
}

}  // namespace

extern "C" size_t apex_cuda_decode_workspace_bytes(int32_t max_seqs, int32_t n_q_heads,
                                                   int32_t head_dim) {
    if (max_seqs < 1 || n_q_heads < 1 || head_dim < 1) return 0;
    long long rows = (long long)max_seqs * kMaxSplits;
    if (rows > kSplitRows) rows = kSplitRows > max_seqs ? kSplitRows : max_seqs;
    return (size_t)rows * n_q_heads * (head_dim + 1) * sizeof(float);
}

extern "C" int apex_cuda_decode_splits(const apex_cuda_decode *a) {
    if (check_args(a)) return 1;
    int chunk;
    return choose_splits(a, &chunk);
}

extern "C" int apex_cuda_paged_decode(const apex_cuda_decode *a, void *stream) {
    int rc = check_args(a);
    if (rc || a->n_seqs == 0) return rc;
    const int group = a->n_q_heads / a->n_kv_heads;
    const int gq = heads_per_block(group);
    const int head_chunks = (group + gq - 1) / gq;
    int chunk = 0;
    const int splits = choose_splits(a, &chunk);

    apexcu::decode_params p;
    p.q = a->q;
    p.out = a->out;
    p.seq_lens = a->seq_lens;
    p.block_table = a->block_table;
    p.kv = (const char *)a->kv;
    p.block_bytes = a->block_bytes;
    const apex_kv_layout lay = apex_kv_layout_of(a->n_kv_heads, a->block_tokens, a->head_dim,
                                                 apex_dtype_size(a->kv_dtype));
    p.v_offset = apex_kv_offset(&lay, 1, 0, 0);
    p.bt_stride = a->block_table_stride;
    p.n_q_heads = a->n_q_heads;
    p.group = group;
    p.head_chunks = head_chunks;
    p.bt_shift = log2_exact(a->block_tokens);
    p.q_dtype = a->q_dtype;
    p.out_dtype = a->out_dtype;
    p.window = a->window > 0 ? a->window : 0;
    p.chunk = chunk;
    p.n_splits = splits;
    const bool capped = a->softcap > 0.0f;
    p.q_scale = capped ? a->scale : a->scale * apexcu::kLog2e;
    p.softcap = capped ? a->softcap : 0.0f;
    p.softcap_inv = capped ? 1.0f / a->softcap : 0.0f;
    p.part_o = nullptr;
    p.part_lse = nullptr;
    if (splits > 1) {
        const size_t rows = (size_t)a->n_seqs * a->n_q_heads * splits;
        p.part_o = (float *)a->workspace;
        p.part_lse = p.part_o + rows * a->head_dim;
    }

    const dim3 grid((unsigned)(a->n_kv_heads * head_chunks), (unsigned)a->n_seqs,
                    (unsigned)splits);
    cudaStream_t s = (cudaStream_t)stream;
    APEXCU_DISPATCH_DTYPE(a->kv_dtype, KV,
                          rc = apexcu_decode_launch<KV>(p, a->head_dim, gq, grid, s));
    if (rc || splits == 1) return rc;
    decode_merge_kernel<<<dim3((unsigned)a->n_q_heads, (unsigned)a->n_seqs), 128, 0, s>>>(
        p.part_o, p.part_lse, a->out, a->out_dtype, a->seq_lens, p.window, chunk, splits,
        a->n_q_heads, a->head_dim);
    return apexcu_last_launch_error();
}
