// Causal attention over the paged KV cache (crates/pagoda-kernels/src/cpu/attention.rs): for every
// query row of a flat batch and every head, softmax(scale * q . k) over the row's sequence's
// context up to and including the row's position, times v, with K/V read through the sequence's
// block table. Grouped-query attention: query head h reads KV head h / (heads / kv_heads).
//
// The simple form: one thread block of WARPS warps per (query row, head). Warp w takes context
// tokens w, w + WARPS, ...; its lanes split the head dimensions (lane l holds dimensions
// l, l + 32, ..., so up to 256) and keep an online softmax (running max, sum and weighted V, f32).
// The warps' partial results are merged at the end. Fast prefill and decode kernels are separate.
//
// The batch layout is validated on the host when it is built; the kernel still never reads outside
// the pages: a row outside every sequence's query span, or a block id outside the pages, makes the
// row NaN.

#include "common.cuh"

namespace {

constexpr int WARPS = 4;
constexpr int MAX_HEAD_DIM = 256;
constexpr int DIMS_PER_LANE = MAX_HEAD_DIM / 32;

#define QUIET_NAN __int_as_float(0x7fc00000)

template <typename T>
__device__ void paged_attention(const T* __restrict__ q, const T* __restrict__ k_pages, const T* __restrict__ v_pages,
                                T* __restrict__ out, const unsigned* __restrict__ query_start,
                                const unsigned* __restrict__ context_len, const unsigned* __restrict__ block_tables,
                                unsigned num_seqs, unsigned max_blocks, unsigned num_tokens, unsigned num_heads,
                                unsigned num_kv_heads, unsigned head_dim, unsigned block_size, unsigned num_blocks,
                                float scale) {
    __shared__ float partial_max[WARPS];
    __shared__ float partial_sum[WARPS];
    __shared__ float partial_out[WARPS][MAX_HEAD_DIM];
    __shared__ int broken;
    const unsigned lane = threadIdx.x & 31;
    const unsigned warp = threadIdx.x >> 5;
    const unsigned head = blockIdx.y;
    const unsigned kv_head = head / (num_heads / num_kv_heads);

    for (unsigned row = blockIdx.x; row < num_tokens; row += gridDim.x) {
        // The sequence owning the row: the last one whose query span starts at or before it.
        unsigned lo = 0;
        unsigned hi = num_seqs;
        while (hi - lo > 1) {
            const unsigned mid = (lo + hi) / 2;
            if (query_start[mid] <= row) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        const unsigned seq = lo;
        const unsigned q_begin = query_start[seq];
        const unsigned q_end = query_start[seq + 1];
        const unsigned context = context_len[seq];
        T* out_row = out + (static_cast<unsigned long long>(row) * num_heads + head) * head_dim;
        if (threadIdx.x == 0) broken = 0;
        __syncthreads();
        if (row < q_begin || row >= q_end || q_end - q_begin > context) {
            for (unsigned d = threadIdx.x; d < head_dim; d += blockDim.x) out_row[d] = from_float<T>(QUIET_NAN);
            __syncthreads();
            continue;
        }
        const unsigned position = context - (q_end - q_begin) + (row - q_begin);
        const unsigned* table = block_tables + static_cast<unsigned long long>(seq) * max_blocks;

        const T* q_row = q + (static_cast<unsigned long long>(row) * num_heads + head) * head_dim;
        float query[DIMS_PER_LANE];
        float acc[DIMS_PER_LANE];
#pragma unroll
        for (int i = 0; i < DIMS_PER_LANE; ++i) {
            const unsigned d = lane + 32 * i;
            query[i] = d < head_dim ? to_float(q_row[d]) : 0.0f;
            acc[i] = 0.0f;
        }
        float max = NEG_INF;
        float sum = 0.0f;
        for (unsigned j = warp; j <= position; j += WARPS) {
            const unsigned block = table[j / block_size];
            if (block >= num_blocks) {
                broken = 1;
                break;
            }
            const unsigned long long base =
                ((static_cast<unsigned long long>(block) * block_size + j % block_size) * num_kv_heads + kv_head) *
                head_dim;
            float dot = 0.0f;
#pragma unroll
            for (int i = 0; i < DIMS_PER_LANE; ++i) {
                const unsigned d = lane + 32 * i;
                if (d < head_dim) dot += query[i] * to_float(k_pages[base + d]);
            }
            const float score = scale * warp_sum(dot);
            const float new_max = fmaxf(max, score);
            const float correction = expf(max - new_max);
            const float weight = expf(score - new_max);
            sum = sum * correction + weight;
#pragma unroll
            for (int i = 0; i < DIMS_PER_LANE; ++i) {
                const unsigned d = lane + 32 * i;
                if (d < head_dim) acc[i] = acc[i] * correction + weight * to_float(v_pages[base + d]);
            }
            max = new_max;
        }

        if (lane == 0) {
            partial_max[warp] = max;
            partial_sum[warp] = sum;
        }
#pragma unroll
        for (int i = 0; i < DIMS_PER_LANE; ++i) {
            const unsigned d = lane + 32 * i;
            if (d < head_dim) partial_out[warp][d] = acc[i];
        }
        __syncthreads();
        float total_max = NEG_INF;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) total_max = fmaxf(total_max, partial_max[w]);
        // A warp that saw no token (context shorter than WARPS) has max -inf and weighs nothing.
        float factor[WARPS];
        float total_sum = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            factor[w] = partial_max[w] == NEG_INF ? 0.0f : expf(partial_max[w] - total_max);
            total_sum += partial_sum[w] * factor[w];
        }
        const float inv_sum = broken ? QUIET_NAN : 1.0f / total_sum;
        for (unsigned d = threadIdx.x; d < head_dim; d += blockDim.x) {
            float value = 0.0f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) value += partial_out[w][d] * factor[w];
            out_row[d] = from_float<T>(value * inv_sum);
        }
        // The partial results are overwritten by the next row.
        __syncthreads();
    }
}

}  // namespace

// q, out [num_tokens, num_heads, head_dim]; k_pages, v_pages [num_blocks, block_size, num_kv_heads,
// head_dim]; query_start [num_seqs + 1] (cumulative, query_start[num_seqs] = num_tokens);
// context_len [num_seqs]; block_tables [num_seqs, max_blocks]. Grid (rows, num_heads), WARPS warps
// per block; head_dim <= 256.
#define PAGODA_PAGED_ATTENTION_KERNELS(SUFFIX, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) paged_attention_##SUFFIX(                              \
        const T* __restrict__ q, const T* __restrict__ k_pages, const T* __restrict__ v_pages, T* __restrict__ out, \
        const unsigned* __restrict__ query_start, const unsigned* __restrict__ context_len,                         \
        const unsigned* __restrict__ block_tables, unsigned num_seqs, unsigned max_blocks, unsigned num_tokens,     \
        unsigned num_heads, unsigned num_kv_heads, unsigned head_dim, unsigned block_size, unsigned num_blocks,     \
        float scale) {                                                                                               \
        paged_attention<T>(q, k_pages, v_pages, out, query_start, context_len, block_tables, num_seqs, max_blocks,  \
                           num_tokens, num_heads, num_kv_heads, head_dim, block_size, num_blocks, scale);           \
    }

PAGODA_FOR_EACH_FLOAT(PAGODA_PAGED_ATTENTION_KERNELS)
