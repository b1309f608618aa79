// Causal attention over the paged KV cache (crates/pagoda-kernels/src/cpu/attention.rs): for every
// query row of a flat batch and every head, softmax(scale * q . k) over the row's sequence's
// context up to and including the row's position, times v, with K/V read through the sequence's
// block table. Grouped-query attention: query head h reads KV head h / (heads / kv_heads).
//
// One thread block of WARPS warps per (query row, head, context split). A split is a run of
// split_len context tokens, walked in tiles of TILE tokens: the block first looks up where every
// token of the tile lives, then computes the tile's scores (warp w takes tokens w, w + WARPS, ...,
// its lanes split the head dimensions - lane l holds l, l + 32, ..., so up to 256 - and a warp sum
// makes the dot product), keeping them in shared memory; one block-wide max and sum per tile
// update the running softmax statistics (f32), and the warps then add the tile's weighted values
// the same way. The loads of KEYS_IN_FLIGHT tokens are issued before any of them is used, so a
// warp waits on memory once per group of tokens rather than once per token.
//
// With one split the block writes the normalised row. Decode batches have too few (row, head)
// pairs to fill the GPU, so the host asks for several splits per context; each block then writes
// its unnormalised partial result (max, sum, weighted values) to a scratch buffer and
// paged_attention_combine merges a row's splits (the flash-decoding scheme).
//
// The batch layout is validated on the host when it is built; the kernel still never reads outside
// the pages: a row outside every sequence's query span, or a block id outside the pages, makes the
// row NaN.

#include "common.cuh"

namespace {

constexpr int WARPS = 8;
constexpr int TILE = 128;
constexpr int KEYS_IN_FLIGHT = 4;
constexpr int MAX_HEAD_DIM = 256;
constexpr int DIMS_PER_LANE = MAX_HEAD_DIM / 32;
// Splits hold a multiple of this many context tokens (SPLIT_GRANULE in paged_attention.rs).
constexpr unsigned SPLIT_GRANULE = 32;

#define QUIET_NAN __int_as_float(0x7fc00000)

// Where a query row sits: its sequence and position, or false for a row outside every span.
struct RowPlace {
    unsigned seq;
    unsigned position;
};

__device__ bool place_row(unsigned row, const unsigned* __restrict__ query_start,
                          const unsigned* __restrict__ context_len, unsigned num_seqs, RowPlace* place) {
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
    const unsigned q_begin = query_start[lo];
    const unsigned q_end = query_start[lo + 1];
    const unsigned context = context_len[lo];
    if (row < q_begin || row >= q_end || q_end - q_begin > context) return false;
    place->seq = lo;
    place->position = context - (q_end - q_begin) + (row - q_begin);
    return true;
}

// Context tokens per split of a sequence whose context is cut into (at most) num_splits splits.
// Each sequence derives its own from its current length, so the grid - fixed by the host from the
// longest context the batch can hold - serves every step of a replayed graph, and a short context
// still spreads over the splits its length allows.
__device__ __forceinline__ unsigned split_length(unsigned context, unsigned num_splits) {
    const unsigned even = (context + num_splits - 1) / num_splits;
    return max(SPLIT_GRANULE, (even + SPLIT_GRANULE - 1) / SPLIT_GRANULE * SPLIT_GRANULE);
}

// Scratch layout per (row, head, split): max, sum, then head_dim weighted values.
__device__ __forceinline__ unsigned long long scratch_offset(unsigned row, unsigned head, unsigned split,
                                                             unsigned num_heads, unsigned num_splits,
                                                             unsigned head_dim) {
    return ((static_cast<unsigned long long>(row) * num_heads + head) * num_splits + split) * (head_dim + 2);
}

template <typename T>
__device__ void paged_attention(const T* __restrict__ q, const T* __restrict__ k_pages, const T* __restrict__ v_pages,
                                T* __restrict__ out, float* __restrict__ scratch,
                                const unsigned* __restrict__ query_start, const unsigned* __restrict__ context_len,
                                const unsigned* __restrict__ block_tables, unsigned num_seqs, unsigned max_blocks,
                                unsigned num_tokens, unsigned num_heads, unsigned num_kv_heads, unsigned head_dim,
                                unsigned block_size, unsigned num_blocks, float scale) {
    __shared__ unsigned long long token_base[TILE];
    __shared__ float weights[TILE];
    __shared__ float partial_out[WARPS][MAX_HEAD_DIM];
    __shared__ int broken;
    const unsigned lane = threadIdx.x & 31;
    const unsigned warp = threadIdx.x >> 5;
    const unsigned head = blockIdx.y;
    const unsigned split = blockIdx.z;
    const unsigned num_splits = gridDim.z;
    const unsigned kv_head = head / (num_heads / num_kv_heads);

    for (unsigned row = blockIdx.x; row < num_tokens; row += gridDim.x) {
        RowPlace place;
        const bool valid = place_row(row, query_start, context_len, num_seqs, &place);
        T* out_row = out + (static_cast<unsigned long long>(row) * num_heads + head) * head_dim;
        if (!valid) {
            // With several splits the combining kernel writes the NaN row.
            if (num_splits == 1) {
                for (unsigned d = threadIdx.x; d < head_dim; d += blockDim.x) out_row[d] = from_float<T>(QUIET_NAN);
            }
            continue;
        }
        const unsigned split_len = split_length(context_len[place.seq], num_splits);
        const unsigned begin = split * split_len;
        const unsigned end = min(begin + split_len, place.position + 1);
        // A split past the row's position holds nothing; the combining kernel skips it.
        if (begin >= end) continue;
        const unsigned* table = block_tables + static_cast<unsigned long long>(place.seq) * max_blocks;

        const T* q_row = q + (static_cast<unsigned long long>(row) * num_heads + head) * head_dim;
        float query[DIMS_PER_LANE];
        float acc[DIMS_PER_LANE];
#pragma unroll
        for (int i = 0; i < DIMS_PER_LANE; ++i) {
            const unsigned d = lane + 32 * i;
            query[i] = d < head_dim ? scale * to_float(q_row[d]) : 0.0f;
            acc[i] = 0.0f;
        }
        float max = NEG_INF;
        float sum = 0.0f;
        if (threadIdx.x == 0) broken = 0;

        for (unsigned tile = begin; tile < end; tile += TILE) {
            const unsigned n = min(static_cast<unsigned>(TILE), end - tile);
            // Earlier tiles (and rows) may still be reading token_base and weights.
            __syncthreads();
            for (unsigned j = threadIdx.x; j < n; j += blockDim.x) {
                const unsigned token = tile + j;
                const unsigned block = table[token / block_size];
                unsigned long long base = 0;
                if (block >= num_blocks) {
                    broken = 1;
                } else {
                    base = ((static_cast<unsigned long long>(block) * block_size + token % block_size) *
                                num_kv_heads +
                            kv_head) *
                           head_dim;
                }
                token_base[j] = base;
            }
            __syncthreads();

            // Scores of the tile.
            for (unsigned first = warp; first < n; first += WARPS * KEYS_IN_FLIGHT) {
                float keys[KEYS_IN_FLIGHT][DIMS_PER_LANE];
#pragma unroll
                for (int k = 0; k < KEYS_IN_FLIGHT; ++k) {
                    const unsigned j = first + k * WARPS;
                    const T* key = k_pages + token_base[j < n ? j : 0];
#pragma unroll
                    for (int i = 0; i < DIMS_PER_LANE; ++i) {
                        const unsigned d = lane + 32 * i;
                        keys[k][i] = (j < n && d < head_dim) ? to_float(key[d]) : 0.0f;
                    }
                }
#pragma unroll
                for (int k = 0; k < KEYS_IN_FLIGHT; ++k) {
                    float dot = 0.0f;
#pragma unroll
                    for (int i = 0; i < DIMS_PER_LANE; ++i) dot += query[i] * keys[k][i];
                    dot = warp_sum(dot);
                    const unsigned j = first + k * WARPS;
                    if (lane == 0 && j < n) weights[j] = dot;
                }
            }
            __syncthreads();

            // One max and one sum per tile; the running statistics and values are rescaled once.
            float tile_max = NEG_INF;
            for (unsigned j = threadIdx.x; j < n; j += blockDim.x) tile_max = fmaxf(tile_max, weights[j]);
            tile_max = block_max(tile_max);
            const float new_max = fmaxf(max, tile_max);
            const float correction = expf(max - new_max);
            float tile_sum = 0.0f;
            for (unsigned j = threadIdx.x; j < n; j += blockDim.x) {
                const float w = expf(weights[j] - new_max);
                weights[j] = w;
                tile_sum += w;
            }
            tile_sum = block_sum(tile_sum);
            sum = sum * correction + tile_sum;
            max = new_max;
#pragma unroll
            for (int i = 0; i < DIMS_PER_LANE; ++i) acc[i] *= correction;
            // block_sum synchronised the block after every thread wrote its weights.

            // Weighted values of the tile.
            for (unsigned first = warp; first < n; first += WARPS * KEYS_IN_FLIGHT) {
                float values[KEYS_IN_FLIGHT][DIMS_PER_LANE];
#pragma unroll
                for (int k = 0; k < KEYS_IN_FLIGHT; ++k) {
                    const unsigned j = first + k * WARPS;
                    const T* value = v_pages + token_base[j < n ? j : 0];
#pragma unroll
                    for (int i = 0; i < DIMS_PER_LANE; ++i) {
                        const unsigned d = lane + 32 * i;
                        values[k][i] = (j < n && d < head_dim) ? to_float(value[d]) : 0.0f;
                    }
                }
#pragma unroll
                for (int k = 0; k < KEYS_IN_FLIGHT; ++k) {
                    const unsigned j = first + k * WARPS;
                    const float w = j < n ? weights[j] : 0.0f;
#pragma unroll
                    for (int i = 0; i < DIMS_PER_LANE; ++i) acc[i] += w * values[k][i];
                }
            }
        }

#pragma unroll
        for (int i = 0; i < DIMS_PER_LANE; ++i) {
            const unsigned d = lane + 32 * i;
            if (d < head_dim) partial_out[warp][d] = acc[i];
        }
        __syncthreads();
        const bool is_broken = broken != 0;
        if (num_splits == 1) {
            const float inv_sum = is_broken ? QUIET_NAN : 1.0f / sum;
            for (unsigned d = threadIdx.x; d < head_dim; d += blockDim.x) {
                float value = 0.0f;
#pragma unroll
                for (int w = 0; w < WARPS; ++w) value += partial_out[w][d];
                out_row[d] = from_float<T>(value * inv_sum);
            }
        } else {
            float* part = scratch + scratch_offset(row, head, split, num_heads, num_splits, head_dim);
            if (threadIdx.x == 0) {
                part[0] = max;
                part[1] = is_broken ? QUIET_NAN : sum;
            }
            for (unsigned d = threadIdx.x; d < head_dim; d += blockDim.x) {
                float value = 0.0f;
#pragma unroll
                for (int w = 0; w < WARPS; ++w) value += partial_out[w][d];
                part[2 + d] = value;
            }
        }
        // partial_out and broken are overwritten by the next row.
        __syncthreads();
    }
}

// Merges the splits of one (row, head): every split's values scaled by exp(its max - the overall
// max), divided by the equally scaled sum of the splits' sums.
template <typename T>
__device__ void paged_attention_combine(const float* __restrict__ scratch, T* __restrict__ out,
                                        const unsigned* __restrict__ query_start,
                                        const unsigned* __restrict__ context_len, unsigned num_seqs,
                                        unsigned num_tokens, unsigned num_heads, unsigned head_dim,
                                        unsigned num_splits) {
    const unsigned head = blockIdx.y;
    for (unsigned row = blockIdx.x; row < num_tokens; row += gridDim.x) {
        RowPlace place;
        T* out_row = out + (static_cast<unsigned long long>(row) * num_heads + head) * head_dim;
        if (!place_row(row, query_start, context_len, num_seqs, &place)) {
            for (unsigned d = threadIdx.x; d < head_dim; d += blockDim.x) out_row[d] = from_float<T>(QUIET_NAN);
            continue;
        }
        // Only the splits that start at or before the row's position were written.
        const unsigned split_len = split_length(context_len[place.seq], num_splits);
        const unsigned used = min(place.position / split_len + 1, num_splits);
        const float* parts = scratch + scratch_offset(row, head, 0, num_heads, num_splits, head_dim);
        const unsigned stride = head_dim + 2;
        float total_max = NEG_INF;
        for (unsigned s = 0; s < used; ++s) total_max = fmaxf(total_max, parts[s * stride]);
        float total_sum = 0.0f;
        for (unsigned s = 0; s < used; ++s) total_sum += parts[s * stride + 1] * expf(parts[s * stride] - total_max);
        const float inv_sum = 1.0f / total_sum;
        for (unsigned d = threadIdx.x; d < head_dim; d += blockDim.x) {
            float value = 0.0f;
            for (unsigned s = 0; s < used; ++s) value += parts[s * stride + 2 + d] * expf(parts[s * stride] - total_max);
            out_row[d] = from_float<T>(value * inv_sum);
        }
    }
}

}  // namespace

// q, out [num_tokens, num_heads, head_dim]; k_pages, v_pages [num_blocks, block_size, num_kv_heads,
// head_dim]; scratch f32 [num_tokens, num_heads, num_splits, head_dim + 2] (unused with one split);
// query_start [num_seqs + 1] (cumulative, query_start[num_seqs] = num_tokens); context_len
// [num_seqs]; block_tables [num_seqs, max_blocks]. Grid (rows, num_heads, num_splits), WARPS warps
// per block; head_dim <= 256; each sequence cuts its context into num_splits splits of
// split_length() tokens.
#define PAGODA_PAGED_ATTENTION_KERNELS(SUFFIX, T)                                                                     \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) paged_attention_##SUFFIX(                               \
        const T* __restrict__ q, const T* __restrict__ k_pages, const T* __restrict__ v_pages, T* __restrict__ out,  \
        float* __restrict__ scratch, const unsigned* __restrict__ query_start,                                       \
        const unsigned* __restrict__ context_len, const unsigned* __restrict__ block_tables, unsigned num_seqs,      \
        unsigned max_blocks, unsigned num_tokens, unsigned num_heads, unsigned num_kv_heads, unsigned head_dim,      \
        unsigned block_size, unsigned num_blocks, float scale) {                                                     \
        paged_attention<T>(q, k_pages, v_pages, out, scratch, query_start, context_len, block_tables, num_seqs,      \
                           max_blocks, num_tokens, num_heads, num_kv_heads, head_dim, block_size, num_blocks,        \
                           scale);                                                                                   \
    }                                                                                                                \
    /* Grid (rows, num_heads), any block size that is a multiple of 32. */                                           \
    extern "C" __global__ void paged_attention_combine_##SUFFIX(                                                     \
        const float* __restrict__ scratch, T* __restrict__ out, const unsigned* __restrict__ query_start,            \
        const unsigned* __restrict__ context_len, unsigned num_seqs, unsigned num_tokens, unsigned num_heads,        \
        unsigned head_dim, unsigned num_splits) {                                                                    \
        paged_attention_combine<T>(scratch, out, query_start, context_len, num_seqs, num_tokens, num_heads,          \
                                   head_dim, num_splits);                                                            \
    }

PAGODA_FOR_EACH_FLOAT(PAGODA_PAGED_ATTENTION_KERNELS)
