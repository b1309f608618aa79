// Causal attention over the paged KV cache (crates/pagoda-kernels/src/cpu/attention.rs): for every
// query row of a flat batch and every head, softmax(scale * q . k) over the row's sequence's
// context up to and including the row's position, times v, with K/V read through the sequence's
// block table. Grouped-query attention: query head h reads KV head h / (heads / kv_heads).
//
// Decode reads every key and value of the context once per step, and there is little arithmetic
// per byte, so the kernel is built to stream K/V at the memory's rate:
//
// - One thread block per (query row, KV head, context split) serves all the query heads that
//   share the KV head (up to GROUP of them, more in several blocks), so each K/V row is read once
//   per group rather than once per query head.
// - A warp splits its 32 lanes into segments of `lanes` lanes (the fewest powers of two whose
//   16-byte chunks cover a head: 16 for 128 f16 dimensions), each segment streaming its own tokens
//   with one 16-byte load per lane per row; the four warps of a block take interleaved steps of
//   LOADS tokens per segment, and every lane issues all of a step's K and V loads before it uses
//   any of them, then asks L2 to fetch the next step's rows, so two steps are in flight while one
//   is computed. Block-table entries for the next step are fetched while the current one is
//   computed, so the dependent lookup never stalls a step.
// - The hot loop has no branches: tokens past the split's end load its first row again and are
//   masked out of the softmax, chunks past the head load its last chunk (under a zero query),
//   block lookups divide by multiplication, and the lanes of a segment sum their partial dot
//   products in one loop over the exchanges, all of a step's scores at once.
// - Each segment keeps its own running softmax statistics (max and sum in the log2 domain, f32),
//   so nothing is synchronised while streaming: segments merge through shuffles at the end of the
//   split, warps through shared memory, splits in paged_attention_combine (the flash-decoding
//   scheme; the host asks for splits when the (row, KV head) pairs alone cannot fill the GPU).
//
// The batch layout is validated on the host when it is built; the kernel still never reads outside
// the pages: a row outside every sequence's query span, or a block id outside the pages, makes the
// row NaN.

#include "common.cuh"

namespace {

constexpr int WARPS = 4;
constexpr int MAX_HEAD_DIM = 256;
// Splits hold a multiple of this many context tokens (SPLIT_GRANULE in paged_attention.rs).
constexpr unsigned SPLIT_GRANULE = 32;
// The most splits a context is cut into (MAX_SPLITS in paged_attention.rs): the combining kernel
// keeps one weight per split in shared memory.
constexpr int MAX_SPLITS = 256;
constexpr float LOG2E = 1.4426950408889634f;

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

// Scratch layout per (row, head, split): max (log2 domain), sum, then head_dim weighted values.
__device__ __forceinline__ unsigned long long scratch_offset(unsigned row, unsigned head, unsigned split,
                                                             unsigned num_heads, unsigned num_splits,
                                                             unsigned head_dim) {
    return ((static_cast<unsigned long long>(row) * num_heads + head) * num_splits + split) * (head_dim + 2);
}

// How a head of T is cut into 16-byte chunks and spread over a segment's lanes.
template <typename T> struct HeadChunks {
    // Elements per 16-byte chunk.
    static constexpr int VEC = 16 / sizeof(T);
    // Chunks per lane when a segment is a whole warp and the head MAX_HEAD_DIM long: 1 for
    // 16-bit types, 2 for f32.
    static constexpr int PER_LANE = MAX_HEAD_DIM / (32 * VEC);
    // Elements a lane holds.
    static constexpr int ELEMS = PER_LANE * VEC;
};

// One 16-byte load of K/V data that this block reads exactly once: through the non-coherent path
// (the pages are not written while the kernel runs) and not kept in L1. L2 fetches 128-byte lines,
// no more: a head's row can be that short, and the next 128 bytes belong to another KV head.
__device__ __forceinline__ uint4 load_stream(const void* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::128B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

__device__ __forceinline__ unsigned bits_of(float x) { return __float_as_uint(x); }
__device__ __forceinline__ unsigned bits_of(half_t x) { return x.bits; }
__device__ __forceinline__ unsigned bits_of(bf16_t x) { return x.bits; }

// The VEC elements at `chunk` as one 16-byte chunk: one vector load when the rows are 16-byte
// aligned and head_dim fills whole chunks (VECTORIZED), else element loads of the first `limit`
// (the head's elements left from here, at least 1) and zeros after them.
template <typename T, bool VECTORIZED>
__device__ __forceinline__ uint4 load_chunk(const T* chunk, unsigned limit) {
    if constexpr (VECTORIZED) {
        return load_stream(chunk);
    } else {
        constexpr int VEC = HeadChunks<T>::VEC;
        constexpr int PER_WORD = 4 / sizeof(T);
        unsigned words[4] = {0u, 0u, 0u, 0u};
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            if (static_cast<unsigned>(i) < limit) words[i / PER_WORD] |= bits_of(chunk[i]) << (32 / PER_WORD * (i % PER_WORD));
        }
        const uint4 raw = {words[0], words[1], words[2], words[3]};
        return raw;
    }
}

// Element i (a compile-time constant once unrolled) of a chunk, as float.
template <typename T> __device__ __forceinline__ float chunk_element(const uint4& raw, int i);

template <> __device__ __forceinline__ float chunk_element<float>(const uint4& raw, int i) {
    const unsigned word = i == 0 ? raw.x : i == 1 ? raw.y : i == 2 ? raw.z : raw.w;
    return __uint_as_float(word);
}

template <> __device__ __forceinline__ float chunk_element<half_t>(const uint4& raw, int i) {
    const unsigned word = i < 2 ? raw.x : i < 4 ? raw.y : i < 6 ? raw.z : raw.w;
    half_t h;
    h.bits = static_cast<unsigned short>(i % 2 == 0 ? word & 0xffffu : word >> 16);
    return to_float(h);
}

template <> __device__ __forceinline__ float chunk_element<bf16_t>(const uint4& raw, int i) {
    const unsigned word = i < 2 ? raw.x : i < 4 ? raw.y : i < 6 ? raw.z : raw.w;
    return __uint_as_float(i % 2 == 0 ? word << 16 : word & 0xffff0000u);
}

// The chunks a lane holds, unpacked to floats.
template <typename T>
__device__ __forceinline__ void unpack(const uint4 (&raw)[HeadChunks<T>::PER_LANE], float (&out)[HeadChunks<T>::ELEMS]) {
    constexpr int VEC = HeadChunks<T>::VEC;
#pragma unroll
    for (int c = 0; c < HeadChunks<T>::PER_LANE; ++c) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) out[c * VEC + i] = chunk_element<T>(raw[c], i);
    }
}

// Sums each of `values` over the lanes of a segment (lanes xor-apart by less than `lanes`, the same
// power of two for the whole warp); every lane of the segment receives the sums. One loop over the
// exchanges a segment needs, each exchanging every value: no shuffle sits under a branch of its
// own, which would cost a divergence check and two jumps per shuffle.
template <int N>
__device__ __forceinline__ void segment_sums(float (&values)[N], unsigned lanes) {
    for (unsigned offset = 1; offset < lanes; offset <<= 1) {
#pragma unroll
        for (int i = 0; i < N; ++i) values[i] += __shfl_xor_sync(0xffffffffu, values[i], offset);
    }
}

// Max / sum of v over the segments of a warp (lanes xor-apart by `lanes` or more).
__device__ __forceinline__ float across_segments_max(float v, unsigned lanes) {
    for (unsigned offset = lanes; offset < 32; offset <<= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

__device__ __forceinline__ float across_segments_sum(float v, unsigned lanes) {
    for (unsigned offset = lanes; offset < 32; offset <<= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Asks L2 to fetch the line holding `p` from memory now, so that the load a step later finds it
// there: the next step's rows are in flight while this step computes, without holding registers.
// (Past the split's end the next step's rows are its first row again, a harmless repeat.)
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// 2^x by the hardware's approximation (relative error near 2^-22, far below what the f32 softmax
// statistics need), without exp2f's extra steps for results below 2^-126, which flush to 0 here.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// exp2(x - max) for a running max that may still be -inf (nothing seen yet): 0 then.
__device__ __forceinline__ float rescale(float x, float max) { return max == NEG_INF ? 0.0f : fast_exp2(x - max); }

// n / d for a divisor fixed for the launch, by a multiply-high, an add and a shift: q = (umulhi(n,
// mul) + n) >> shift with shift = ceil(log2 d) and mul = floor(2^32 (2^shift - d) / d) + 1 (Granlund
// and Montgomery, "Division by invariant integers using multiplication", 1994), exact for every
// 32-bit n. The constants cost one 64-bit division per thread, the quotients a few instructions.
struct Divisor {
    unsigned divisor;
    unsigned mul;
    unsigned shift;

    __device__ explicit Divisor(unsigned d) : divisor(d), shift(32 - __clz(d - 1)) {
        mul = static_cast<unsigned>(((1ull << 32) * ((1ull << shift) - d)) / d + 1);
    }

    __device__ __forceinline__ unsigned quotient(unsigned n) const {
        return static_cast<unsigned>((static_cast<unsigned long long>(__umulhi(n, mul)) + n) >> shift);
    }
};

// Where a block's warps hand their statistics and values to each other at the end of a split: one
// per group width, shared by both load paths of a kernel.
template <int GROUP> struct MergeSpace {
    float values[WARPS][GROUP][MAX_HEAD_DIM];
    float max[WARPS][GROUP];
    float sum[WARPS][GROUP];
};

template <int GROUP> __device__ __forceinline__ MergeSpace<GROUP>& merge_space() {
    __shared__ MergeSpace<GROUP> space;
    return space;
}

template <typename T, int GROUP, bool VECTORIZED>
__device__ void paged_attention(const T* __restrict__ q, const T* __restrict__ k_pages, const T* __restrict__ v_pages,
                                T* __restrict__ out, float* __restrict__ scratch,
                                const unsigned* __restrict__ query_start, const unsigned* __restrict__ context_len,
                                const unsigned* __restrict__ block_tables, unsigned num_seqs, unsigned max_blocks,
                                unsigned num_tokens, unsigned num_heads, unsigned num_kv_heads, unsigned head_dim,
                                unsigned block_size, unsigned num_blocks, float scale) {
    constexpr int VEC = HeadChunks<T>::VEC;
    constexpr int PER_LANE = HeadChunks<T>::PER_LANE;
    constexpr int ELEMS = HeadChunks<T>::ELEMS;
    // Tokens each lane has in flight per step (their K and V rows): fewer for large groups, whose
    // queries and accumulators take the registers.
    constexpr int LOADS = GROUP <= 4 ? 4 : 2;

    MergeSpace<GROUP>& merge = merge_space<GROUP>();

    const unsigned lane = threadIdx.x & 31;
    const unsigned warp = threadIdx.x >> 5;
    const unsigned group_size = num_heads / num_kv_heads;
    const unsigned head_blocks = (group_size + GROUP - 1) / GROUP;
    const unsigned kv_head = blockIdx.y / head_blocks;
    const unsigned first_head = kv_head * group_size + (blockIdx.y % head_blocks) * GROUP;
    const unsigned heads_here = min(static_cast<unsigned>(GROUP), (kv_head + 1) * group_size - first_head);
    const unsigned split = blockIdx.z;
    const unsigned num_splits = gridDim.z;

    // Lanes per token: the fewest (a power of two) whose chunks cover the head.
    const unsigned chunks = (head_dim + VEC - 1) / VEC;
    unsigned lanes = 1;
    while (lanes * PER_LANE < chunks) lanes <<= 1;
    const unsigned segments = 32 / lanes;
    const unsigned segment = lane / lanes;
    const unsigned part = lane % lanes;
    // This lane's chunks of a row: part, part + lanes, ... A chunk past the head reads the row's
    // last chunk instead - its query is 0 and its values are never written out - so every load is
    // in bounds and none needs a predicate.
    unsigned chunk_first[PER_LANE];
    bool chunk_active[PER_LANE];
#pragma unroll
    for (int c = 0; c < PER_LANE; ++c) {
        const unsigned chunk = part + c * lanes;
        chunk_active[c] = chunk < chunks;
        chunk_first[c] = min(chunk, chunks - 1) * VEC;
    }
    // Bytes from one slot's row to the next; slots (block * block_size + offset) fit in 32 bits
    // (the launcher checks), so a row's byte offset is one 32 x 32 -> 64-bit multiply.
    const unsigned row_bytes = num_kv_heads * head_dim * static_cast<unsigned>(sizeof(T));
    // This lane's chunks of the KV head's row in slot 0: a token's are a row offset further.
    const char* k_lane[PER_LANE];
    const char* v_lane[PER_LANE];
#pragma unroll
    for (int c = 0; c < PER_LANE; ++c) {
        const unsigned long long first = static_cast<unsigned long long>(kv_head) * head_dim + chunk_first[c];
        k_lane[c] = reinterpret_cast<const char*>(k_pages + first);
        v_lane[c] = reinterpret_cast<const char*>(v_pages + first);
    }
    const Divisor block_divisor(block_size);
    const unsigned step_tokens = LOADS * segments;
    const unsigned stride = WARPS * step_tokens;
    const float log2_scale = scale * LOG2E;

    for (unsigned row = blockIdx.x; row < num_tokens; row += gridDim.x) {
        RowPlace place;
        if (!place_row(row, query_start, context_len, num_seqs, &place)) {
            // With several splits the combining kernel writes the NaN row.
            if (num_splits == 1) {
                T* out_row = out + (static_cast<unsigned long long>(row) * num_heads + first_head) * head_dim;
                for (unsigned i = threadIdx.x; i < heads_here * head_dim; i += blockDim.x) {
                    out_row[i] = from_float<T>(QUIET_NAN);
                }
            }
            continue;
        }
        const unsigned split_len = split_length(context_len[place.seq], num_splits);
        const unsigned begin = split * split_len;
        const unsigned end = min(begin + split_len, place.position + 1);
        // A split past the row's position holds nothing; the combining kernel skips it.
        if (begin >= end) continue;
        const unsigned* table = block_tables + static_cast<unsigned long long>(place.seq) * max_blocks;

        // The group's queries, pre-multiplied by scale * log2(e) so that scores are in the log2
        // domain; lane `part` of a segment holds chunks part, part + lanes, ...
        float query[GROUP][ELEMS];
        float acc[GROUP][ELEMS];
        float run_max[GROUP];
        float run_sum[GROUP];
        const T* q_row = q + (static_cast<unsigned long long>(row) * num_heads + first_head) * head_dim;
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
#pragma unroll
            for (int c = 0; c < PER_LANE; ++c) {
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    const unsigned d = chunk_first[c] + i;
                    const bool used = g < heads_here && chunk_active[c] && d < head_dim;
                    query[g][c * VEC + i] = used ? log2_scale * to_float(q_row[g * head_dim + d]) : 0.0f;
                    acc[g][c * VEC + i] = 0.0f;
                }
            }
            run_max[g] = NEG_INF;
            run_sum[g] = 0.0f;
        }

        // Byte offset of a context token's row (that of slot 0 for a block id outside the pages,
        // which makes the result NaN).
        bool broken = false;
        auto row_offset = [&](unsigned token) {
            const unsigned index = block_divisor.quotient(token);
            const unsigned block = table[index];
            broken |= block >= num_blocks;
            const unsigned slot = block < num_blocks ? block * block_size + (token - index * block_size) : 0u;
            return static_cast<unsigned long long>(slot) * row_bytes;
        };
        // This lane's rows of the step starting at `start`. Tokens past the split's end read the
        // split's first row, already in flight or in cache, and are masked out of the softmax: no
        // load needs a predicate and no lookup a branch.
        unsigned long long offset[LOADS];
        auto locate = [&](unsigned start) {
#pragma unroll
            for (int u = 0; u < LOADS; ++u) {
                const unsigned token = start + u * segments + segment;
                offset[u] = row_offset(token < end ? token : begin);
            }
        };

        // Stream this warp's steps of the split. The loop bounds depend on the warp only, so every
        // lane reaches the shuffles.
        {
            unsigned first = begin + warp * step_tokens;
            locate(first);
            for (; first < end; first += stride) {
                uint4 keys[LOADS][PER_LANE];
                uint4 values[LOADS][PER_LANE];
#pragma unroll
                for (int u = 0; u < LOADS; ++u) {
#pragma unroll
                    for (int c = 0; c < PER_LANE; ++c) {
                        const unsigned limit = head_dim - chunk_first[c];
                        keys[u][c] = load_chunk<T, VECTORIZED>(reinterpret_cast<const T*>(k_lane[c] + offset[u]), limit);
                        values[u][c] = load_chunk<T, VECTORIZED>(reinterpret_cast<const T*>(v_lane[c] + offset[u]), limit);
                    }
                }
                // Tokens of this lane's segment left in the split, from this step on.
                const int remaining = static_cast<int>(end - first) - static_cast<int>(segment);
                locate(first + stride);
                if constexpr (VECTORIZED) {
#pragma unroll
                    for (int u = 0; u < LOADS; ++u) {
#pragma unroll
                        for (int c = 0; c < PER_LANE; ++c) {
                            prefetch_l2(k_lane[c] + offset[u]);
                            prefetch_l2(v_lane[c] + offset[u]);
                        }
                    }
                }

                float score[LOADS * GROUP];
#pragma unroll
                for (int u = 0; u < LOADS; ++u) {
                    float key[ELEMS];
                    unpack<T>(keys[u], key);
#pragma unroll
                    for (int g = 0; g < GROUP; ++g) {
                        float dot = 0.0f;
#pragma unroll
                        for (int e = 0; e < ELEMS; ++e) dot += query[g][e] * key[e];
                        score[u * GROUP + g] = dot;
                    }
                }
                segment_sums(score, lanes);
#pragma unroll
                for (int u = 0; u < LOADS; ++u) {
                    const bool valid = static_cast<int>(u * segments) < remaining;
#pragma unroll
                    for (int g = 0; g < GROUP; ++g) score[u * GROUP + g] = valid ? score[u * GROUP + g] : NEG_INF;
                }
#pragma unroll
                for (int g = 0; g < GROUP; ++g) {
                    float new_max = run_max[g];
#pragma unroll
                    for (int u = 0; u < LOADS; ++u) new_max = fmaxf(new_max, score[u * GROUP + g]);
                    // A segment that has seen no token yet keeps a max of -inf; exponents relative
                    // to 0 then give the 0 weights its (masked) scores and empty history deserve.
                    const float base = new_max == NEG_INF ? 0.0f : new_max;
                    const float correction = fast_exp2(run_max[g] - base);
                    run_sum[g] *= correction;
#pragma unroll
                    for (int e = 0; e < ELEMS; ++e) acc[g][e] *= correction;
#pragma unroll
                    for (int u = 0; u < LOADS; ++u) {
                        score[u * GROUP + g] = fast_exp2(score[u * GROUP + g] - base);
                        run_sum[g] += score[u * GROUP + g];
                    }
                    run_max[g] = new_max;
                }
#pragma unroll
                for (int u = 0; u < LOADS; ++u) {
                    float value[ELEMS];
                    unpack<T>(values[u], value);
#pragma unroll
                    for (int g = 0; g < GROUP; ++g) {
#pragma unroll
                        for (int e = 0; e < ELEMS; ++e) acc[g][e] += score[u * GROUP + g] * value[e];
                    }
                }
            }
        }

        // Merge the warp's segments, then hand each warp's statistics and values to the block.
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            const float warp_max = across_segments_max(run_max[g], lanes);
            const float weight = rescale(run_max[g], warp_max);
            const float warp_sum = across_segments_sum(run_sum[g] * weight, lanes);
#pragma unroll
            for (int e = 0; e < ELEMS; ++e) acc[g][e] = across_segments_sum(acc[g][e] * weight, lanes);
            if (segment == 0) {
#pragma unroll
                for (int c = 0; c < PER_LANE; ++c) {
#pragma unroll
                    for (int i = 0; i < VEC; ++i) {
                        const unsigned d = chunk_first[c] + i;
                        if (chunk_active[c] && d < head_dim) merge.values[warp][g][d] = acc[g][c * VEC + i];
                    }
                }
            }
            if (lane == 0) {
                merge.max[warp][g] = warp_max;
                merge.sum[warp][g] = warp_sum;
            }
        }
        const bool is_broken = __syncthreads_or(broken) != 0;

        for (unsigned i = threadIdx.x; i < heads_here * head_dim; i += blockDim.x) {
            const unsigned g = i / head_dim;
            const unsigned d = i - g * head_dim;
            float max = NEG_INF;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) max = fmaxf(max, merge.max[w][g]);
            float sum = 0.0f;
            float value = 0.0f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) {
                const float weight = rescale(merge.max[w][g], max);
                sum += merge.sum[w][g] * weight;
                value += merge.values[w][g][d] * weight;
            }
            const unsigned head = first_head + g;
            if (num_splits == 1) {
                const float result = is_broken ? QUIET_NAN : value / sum;
                out[(static_cast<unsigned long long>(row) * num_heads + head) * head_dim + d] = from_float<T>(result);
            } else {
                float* part_out = scratch + scratch_offset(row, head, split, num_heads, num_splits, head_dim);
                part_out[2 + d] = value;
                if (d == 0) {
                    part_out[0] = max;
                    part_out[1] = is_broken ? QUIET_NAN : sum;
                }
            }
        }
        // The shared statistics are overwritten by the next row.
        __syncthreads();
    }
}

// Merges the splits of one (row, head): every split's values scaled by exp2(its max - the overall
// max), divided by the equally scaled sum of the splits' sums.
template <typename T>
__device__ void paged_attention_combine(const float* __restrict__ scratch, T* __restrict__ out,
                                        const unsigned* __restrict__ query_start,
                                        const unsigned* __restrict__ context_len, unsigned num_seqs,
                                        unsigned num_tokens, unsigned num_heads, unsigned head_dim,
                                        unsigned num_splits) {
    __shared__ float weights[MAX_SPLITS];
    const unsigned head = blockIdx.y;
    for (unsigned row = blockIdx.x; row < num_tokens; row += gridDim.x) {
        RowPlace place;
        T* out_row = out + (static_cast<unsigned long long>(row) * num_heads + head) * head_dim;
        if (!place_row(row, query_start, context_len, num_seqs, &place)) {
            for (unsigned d = threadIdx.x; d < head_dim; d += blockDim.x) out_row[d] = from_float<T>(QUIET_NAN);
            continue;
        }
        // Only the splits that start at or before the row's position were written; the first
        // always was, so the overall max is finite.
        const unsigned split_len = split_length(context_len[place.seq], num_splits);
        const unsigned used = min(place.position / split_len + 1, num_splits);
        const float* parts = scratch + scratch_offset(row, head, 0, num_heads, num_splits, head_dim);
        const unsigned stride = head_dim + 2;
        float max = NEG_INF;
        for (unsigned s = threadIdx.x; s < used; s += blockDim.x) max = fmaxf(max, parts[s * stride]);
        max = block_max(max);
        float sum = 0.0f;
        for (unsigned s = threadIdx.x; s < used; s += blockDim.x) {
            const float weight = exp2f(parts[s * stride] - max);
            weights[s] = weight;
            sum += parts[s * stride + 1] * weight;
        }
        // block_sum synchronises the block after every weight is written.
        const float inv_sum = 1.0f / block_sum(sum);
        for (unsigned d = threadIdx.x; d < head_dim; d += blockDim.x) {
            float value = 0.0f;
            for (unsigned s = 0; s < used; ++s) value += parts[s * stride + 2 + d] * weights[s];
            out_row[d] = from_float<T>(value * inv_sum);
        }
        // The weights are overwritten by the next row.
        __syncthreads();
    }
}

}  // namespace

// q, out [num_tokens, num_heads, head_dim]; k_pages, v_pages [num_blocks, block_size, num_kv_heads,
// head_dim]; scratch f32 [num_tokens, num_heads, num_splits, head_dim + 2] (unused with one split);
// query_start [num_seqs + 1] (cumulative, query_start[num_seqs] = num_tokens); context_len
// [num_seqs]; block_tables [num_seqs, max_blocks]. Grid (rows, num_kv_heads * ceil(group / GROUP),
// num_splits <= MAX_SPLITS), WARPS warps per block; head_dim <= 256; each sequence cuts its
// context into num_splits splits of split_length() tokens. `_g<GROUP>` serves up to GROUP query
// heads per KV head in one block.
// Blocks each SM must be able to hold, which caps the registers a thread may use: four (16 warps,
// 128 registers) for 16-bit groups of up to 3 heads, three for groups of 4, whose queries and
// accumulators would spill at 128; no cap for f32 and groups of 8, which hold twice the values.
#define MIN_BLOCKS(T, GROUP) (sizeof(T) == 4 ? 1 : (GROUP) <= 3 ? 4 : (GROUP) == 4 ? 3 : 1)

#define PAGODA_PAGED_ATTENTION_GROUP(SUFFIX, T, GROUP)                                                              \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS(T, GROUP)) paged_attention_g##GROUP##_##SUFFIX( \
        const T* __restrict__ q, const T* __restrict__ k_pages, const T* __restrict__ v_pages, T* __restrict__ out,  \
        float* __restrict__ scratch, const unsigned* __restrict__ query_start,                                       \
        const unsigned* __restrict__ context_len, const unsigned* __restrict__ block_tables, unsigned num_seqs,      \
        unsigned max_blocks, unsigned num_tokens, unsigned num_heads, unsigned num_kv_heads, unsigned head_dim,      \
        unsigned block_size, unsigned num_blocks, float scale) {                                                     \
        /* 16-byte loads (and L2 prefetches) when the rows allow them, element loads otherwise. */                  \
        if (head_dim % (16 / sizeof(T)) == 0 && is_aligned16(k_pages) && is_aligned16(v_pages)) {                   \
            paged_attention<T, GROUP, true>(q, k_pages, v_pages, out, scratch, query_start, context_len,             \
                                            block_tables, num_seqs, max_blocks, num_tokens, num_heads, num_kv_heads, \
                                            head_dim, block_size, num_blocks, scale);                                \
        } else {                                                                                                     \
            paged_attention<T, GROUP, false>(q, k_pages, v_pages, out, scratch, query_start, context_len,            \
                                             block_tables, num_seqs, max_blocks, num_tokens, num_heads,              \
                                             num_kv_heads, head_dim, block_size, num_blocks, scale);                 \
        }                                                                                                            \
    }

#define PAGODA_PAGED_ATTENTION_KERNELS(SUFFIX, T)                                                                     \
    PAGODA_PAGED_ATTENTION_GROUP(SUFFIX, T, 1)                                                                       \
    PAGODA_PAGED_ATTENTION_GROUP(SUFFIX, T, 2)                                                                       \
    PAGODA_PAGED_ATTENTION_GROUP(SUFFIX, T, 3)                                                                       \
    PAGODA_PAGED_ATTENTION_GROUP(SUFFIX, T, 4)                                                                       \
    PAGODA_PAGED_ATTENTION_GROUP(SUFFIX, T, 8)                                                                       \
    /* Grid (rows, num_heads), any block size that is a multiple of 32. */                                           \
    extern "C" __global__ void paged_attention_combine_##SUFFIX(                                                     \
        const float* __restrict__ scratch, T* __restrict__ out, const unsigned* __restrict__ query_start,            \
        const unsigned* __restrict__ context_len, unsigned num_seqs, unsigned num_tokens, unsigned num_heads,        \
        unsigned head_dim, unsigned num_splits) {                                                                    \
        paged_attention_combine<T>(scratch, out, query_start, context_len, num_seqs, num_tokens, num_heads,          \
                                   head_dim, num_splits);                                                            \
    }

PAGODA_FOR_EACH_FLOAT(PAGODA_PAGED_ATTENTION_KERNELS)
