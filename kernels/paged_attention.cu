// Causal attention over the paged KV cache (crates/pagoda-kernels/src/cpu/attention.rs): for every
// query row of a flat batch and every head, softmax(scale * q . k) over the row's sequence's
// context up to and including the row's position, times v, with K/V read through the sequence's
// block table. Grouped-query attention: query head h reads KV head h / (heads / kv_heads).
//
// Decode reads every key and value of the context once per step, and there is little arithmetic
// per byte, so the kernels are built to stream K/V at the memory's rate. One thread block per
// (query row, KV head, context split) serves all the query heads that share the KV head, so each
// K/V row is read once per group; each sequence's context is cut into splits of near-equal
// length (split_range), whose partial results paged_attention_combine merges (the
// flash-decoding scheme; the host asks for splits when the (row, KV head) pairs alone cannot fill
// the GPU). The merge may be launched to overlap the split kernel (programmatic dependent launch,
// the host's choice): the split kernels let it be scheduled as soon as all their blocks run, so
// its blocks are resident and waiting when the last split ends instead of being launched only
// then. Two kernels compute a split:
//
// - paged_attention_mma (16-bit K/V, heads of 64, 96 or 128 dimensions, 16-byte aligned pages):
//   each warp takes tiles of 16 tokens and multiplies on the tensor cores, scores as S^T = K Q^T
//   and outputs as O^T = V^T P^T (m16n8k16, up to 8 query heads as the n dimension). Every lane
//   loads whole 16-byte chunks of two token rows, and the chunks' element order is chosen so that
//   they are the MMA fragments as loaded: the dot product's dimensions may be visited in any order
//   as long as Q's fragment uses the same one. V's fragments need tokens along the k dimension,
//   which movmatrix transposes in registers, 8 x 8 elements at a time. A 16-token tile (8 KiB of
//   K and V at 128 dimensions) takes a warp about 270 instructions in the sm_90a build, where the
//   CUDA-core kernel's f32 dot products and shuffle reductions take about 730 for the same bytes
//   with groups of 4 heads; each lane asks L2 for the rows of the tile `prefetch_tiles` steps
//   ahead of its loads. The pipelined forms (PIPELINED) keep two tiles in registers and issue a
//   tile's loads a tile before its arithmetic: a launch of few rows, whose warps are too few to
//   hide L2's latency once per tile, keeps two tiles per warp in flight.
// - paged_attention_g<GROUP> (f32, other head sizes, misaligned pages): a warp splits its 32 lanes
//   into segments of `lanes` lanes (the fewest powers of two whose 16-byte chunks cover a head),
//   each segment streaming its own tokens with one 16-byte load per lane per row and f32 dot
//   products reduced by shuffles; every lane issues all of a step's K and V loads before it uses
//   any of them, then asks L2 to fetch the next step's rows. Chunks past the head load its last
//   chunk (under a zero query).
//
// In both, the hot loop has no branches: tokens past the split's end load its first row again and
// are masked out of the softmax, and block lookups divide by multiplication. Running softmax
// statistics are f32, in the log2 domain; nothing is synchronised while streaming: warps merge
// through shared memory at the end of the split.
//
// The batch layout is validated on the host when it is built; the kernels still never read outside
// the pages: a row outside every sequence's query span, or a block id outside the pages, makes the
// row NaN.

#include "common.cuh"
#include "mma.cuh"

namespace {

// Warps per block of paged_attention_g<GROUP> (WARPS in paged_attention.rs).
constexpr int WARPS = 4;
constexpr int MAX_HEAD_DIM = 256;
// A split holds at least this many context tokens (MIN_SPLIT_TOKENS in paged_attention.rs): one
// step of a block's warps, so that no warp of a split idles for want of tokens.
constexpr unsigned MIN_SPLIT_TOKENS = 64;
// The most splits a context is cut into (MAX_SPLITS in paged_attention.rs): the combining kernel
// keeps one weight per split in shared memory.
constexpr int MAX_SPLITS = 256;
// Threads per block of paged_attention_combine (COMBINE_THREADS in paged_attention.rs).
constexpr int COMBINE_THREADS = 256;
// The most tiles ahead of its loads paged_attention_mma asks L2 for (MAX_PREFETCH_TILES in
// paged_attention.rs).
constexpr unsigned MAX_PREFETCH_TILES = 4;
constexpr float LOG2E = 1.4426950408889634f;

#define QUIET_NAN __int_as_float(0x7fc00000)

// Where a query row sits: its sequence and position, or false for a row outside every span.
struct RowPlace {
    unsigned seq;
    unsigned context;
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
    place->context = context;
    place->position = context - (q_end - q_begin) + (row - q_begin);
    return true;
}

// The context tokens [begin, end) that split `split` of `num_splits` covers: the context is cut
// into as many pieces as it has MIN_SPLIT_TOKENS tokens for (at most num_splits, at least one),
// as even as whole tokens allow; the splits past them are empty (begin == end). Each sequence
// derives its own from its current length, so the grid - fixed by the host from the longest
// context the batch can hold - serves every step of a replayed graph.
__device__ __forceinline__ void split_range(unsigned context, unsigned num_splits, unsigned split, unsigned* begin,
                                            unsigned* end) {
    const unsigned long long pieces = max(1u, min(num_splits, context / MIN_SPLIT_TOKENS));
    *begin = static_cast<unsigned>(min(static_cast<unsigned long long>(split), pieces) * context / pieces);
    *end = static_cast<unsigned>(min(static_cast<unsigned long long>(split) + 1, pieces) * context / pieces);
}

// The scratch of the splits, for rows x heads x splits: first every split's head_dim weighted
// values, then every split's two statistics (max in the log2 domain, sum of weights), so that
// each split's values start 16-byte aligned when head_dim is a multiple of 4.
struct SplitScratch {
    float* values;
    float* stats;

    __device__ SplitScratch(float* scratch, unsigned num_tokens, unsigned num_heads, unsigned num_splits,
                            unsigned head_dim)
        : values(scratch),
          stats(scratch + static_cast<unsigned long long>(num_tokens) * num_heads * num_splits * head_dim) {}

    __device__ __forceinline__ unsigned long long index(unsigned row, unsigned head, unsigned split,
                                                        unsigned num_heads, unsigned num_splits) const {
        return (static_cast<unsigned long long>(row) * num_heads + head) * num_splits + split;
    }
};

// The query heads a block serves (`heads_here` heads from `first_head`, all of KV head
// `kv_head`'s group) and its split, with the launch's sizes: what every write of the block's
// results needs.
struct BlockTask {
    unsigned kv_head;
    unsigned first_head;
    unsigned heads_here;
    unsigned split;
    unsigned num_splits;
    unsigned num_tokens;
    unsigned num_heads;
    unsigned head_dim;

    // Grid (rows, num_kv_heads * blocks per KV head, num_splits): blockIdx.y picks the KV head and
    // which `per_block` heads of its group, blockIdx.z the split.
    __device__ BlockTask(unsigned per_block, unsigned num_tokens, unsigned num_heads, unsigned num_kv_heads,
                         unsigned head_dim) {
        const unsigned group_size = num_heads / num_kv_heads;
        const unsigned head_blocks = (group_size + per_block - 1) / per_block;
        kv_head = blockIdx.y / head_blocks;
        first_head = kv_head * group_size + (blockIdx.y % head_blocks) * per_block;
        heads_here = min(per_block, (kv_head + 1) * group_size - first_head);
        split = blockIdx.z;
        num_splits = gridDim.z;
        this->num_tokens = num_tokens;
        this->num_heads = num_heads;
        this->head_dim = head_dim;
    }
};

// Where the batch's query rows and contexts are (DeviceBatchLayout in paged_attention.rs).
struct BatchLayout {
    const unsigned* __restrict__ query_start;
    const unsigned* __restrict__ context_len;
    const unsigned* __restrict__ block_tables;
    unsigned num_seqs;
    unsigned max_blocks;
};

// The part of a row's context a block streams: its sequence's block table and the tokens
// [begin, end) of its split that the row may attend to.
struct SplitWork {
    const unsigned* __restrict__ table;
    unsigned begin;
    unsigned end;
};

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


// Where a block's warps hand their statistics and values to each other at the end of a split.
template <int GROUP, int NWARPS, int DIM> struct MergeSpace {
    float values[NWARPS][GROUP][DIM];
    float max[NWARPS][GROUP];
    float sum[NWARPS][GROUP];
};

template <int GROUP, int NWARPS, int DIM> __device__ __forceinline__ MergeSpace<GROUP, NWARPS, DIM>& merge_space() {
    __shared__ MergeSpace<GROUP, NWARPS, DIM> space;
    return space;
}

// Writes what a block has for a split that holds none of the row's context: statistics that give
// it no weight in the merge (or, for a row outside every sequence, NaN), with several splits; a
// NaN row with one split. Every block of a split launch writes its statistics, so the merge needs
// no knowledge of which splits held tokens.
template <typename T>
__device__ void write_no_tokens(T* __restrict__ out, float* __restrict__ scratch, unsigned row, const BlockTask& task,
                                bool row_is_valid) {
    if (task.num_splits == 1) {
        // A valid row's only split always holds its first token; this row is outside every span.
        T* out_row = out + (static_cast<unsigned long long>(row) * task.num_heads + task.first_head) * task.head_dim;
        for (unsigned i = threadIdx.x; i < task.heads_here * task.head_dim; i += blockDim.x) {
            out_row[i] = from_float<T>(QUIET_NAN);
        }
        return;
    }
    const SplitScratch parts(scratch, task.num_tokens, task.num_heads, task.num_splits, task.head_dim);
    for (unsigned g = threadIdx.x; g < task.heads_here; g += blockDim.x) {
        const unsigned head = task.first_head + g;
        float* stats = parts.stats + 2 * parts.index(row, head, task.split, task.num_heads, task.num_splits);
        stats[0] = row_is_valid ? NEG_INF : 0.0f;
        stats[1] = row_is_valid ? 0.0f : QUIET_NAN;
    }
}

// The row prologue of both split kernels: places the row and cuts its split; when the split holds
// none of the row's context, or the row lies outside every sequence, writes what the merge needs
// instead (write_no_tokens) and returns false.
template <typename T>
__device__ bool start_split(const BatchLayout& layout, const BlockTask& task, unsigned row, T* __restrict__ out,
                            float* __restrict__ scratch, SplitWork* work) {
    RowPlace place;
    if (!place_row(row, layout.query_start, layout.context_len, layout.num_seqs, &place)) {
        write_no_tokens(out, scratch, row, task, false);
        return false;
    }
    split_range(place.context, task.num_splits, task.split, &work->begin, &work->end);
    work->end = min(work->end, place.position + 1);
    if (work->begin >= work->end) {
        write_no_tokens(out, scratch, row, task, true);
        return false;
    }
    work->table = layout.block_tables + static_cast<unsigned long long>(place.seq) * layout.max_blocks;
    return true;
}

// Merges the warps' statistics and values (in `merge`, complete after a barrier) and writes the
// split's result: the output row itself with one split, else the split's values and statistics.
template <typename T, int GROUP, int NWARPS, int DIM>
__device__ void write_split(const MergeSpace<GROUP, NWARPS, DIM>& merge, bool is_broken, T* __restrict__ out,
                            float* __restrict__ scratch, unsigned row, const BlockTask& task) {
    const unsigned head_dim = task.head_dim;
    const SplitScratch parts(scratch, task.num_tokens, task.num_heads, task.num_splits, head_dim);
    for (unsigned i = threadIdx.x; i < task.heads_here * head_dim; i += blockDim.x) {
        const unsigned g = i / head_dim;
        const unsigned d = i - g * head_dim;
        float max = NEG_INF;
#pragma unroll
        for (int w = 0; w < NWARPS; ++w) max = fmaxf(max, merge.max[w][g]);
        float sum = 0.0f;
        float value = 0.0f;
#pragma unroll
        for (int w = 0; w < NWARPS; ++w) {
            const float weight = rescale(merge.max[w][g], max);
            sum += merge.sum[w][g] * weight;
            value += merge.values[w][g][d] * weight;
        }
        const unsigned head = task.first_head + g;
        if (task.num_splits == 1) {
            const float result = is_broken ? QUIET_NAN : value / sum;
            out[(static_cast<unsigned long long>(row) * task.num_heads + head) * head_dim + d] = from_float<T>(result);
        } else {
            const unsigned long long at = parts.index(row, head, task.split, task.num_heads, task.num_splits);
            parts.values[at * head_dim + d] = value;
            if (d == 0) {
                parts.stats[2 * at] = max;
                parts.stats[2 * at + 1] = is_broken ? QUIET_NAN : sum;
            }
        }
    }
}

// One split of a row for up to GROUP query heads of one KV head, on the CUDA cores: segments of
// lanes stream their own tokens, f32 dot products summed by shuffles.
template <typename T, int GROUP, bool VECTORIZED>
__device__ void paged_attention_fma(const T* __restrict__ q, const T* __restrict__ k_pages,
                                    const T* __restrict__ v_pages, T* __restrict__ out, float* __restrict__ scratch,
                                    const BatchLayout& layout, unsigned num_tokens,
                                    unsigned num_heads, unsigned num_kv_heads, unsigned head_dim, unsigned block_size,
                                    unsigned num_blocks, float scale) {
    constexpr int VEC = HeadChunks<T>::VEC;
    constexpr int PER_LANE = HeadChunks<T>::PER_LANE;
    constexpr int ELEMS = HeadChunks<T>::ELEMS;
    // Tokens each lane has in flight per step (their K and V rows): fewer for large groups, whose
    // queries and accumulators take the registers.
    constexpr int LOADS = GROUP <= 4 ? 4 : 2;

    MergeSpace<GROUP, WARPS, MAX_HEAD_DIM>& merge = merge_space<GROUP, WARPS, MAX_HEAD_DIM>();

    const unsigned lane = threadIdx.x & 31;
    const unsigned warp = threadIdx.x >> 5;
    const BlockTask task(GROUP, num_tokens, num_heads, num_kv_heads, head_dim);
    const unsigned kv_head = task.kv_head;
    const unsigned first_head = task.first_head;
    const unsigned heads_here = task.heads_here;

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
        SplitWork work;
        if (start_split(layout, task, row, out, scratch, &work)) {
            const unsigned begin = work.begin;
            const unsigned end = work.end;
            const unsigned* table = work.table;

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
                            const T* k_row = reinterpret_cast<const T*>(k_lane[c] + offset[u]);
                            const T* v_row = reinterpret_cast<const T*>(v_lane[c] + offset[u]);
                            keys[u][c] = load_chunk<T, VECTORIZED>(k_row, limit);
                            values[u][c] = load_chunk<T, VECTORIZED>(v_row, limit);
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
            write_split<T, GROUP, WARPS, MAX_HEAD_DIM>(merge, is_broken, out, scratch, row, task);
            // The shared statistics are overwritten by the next row.
            __syncthreads();
        }
    }
}

// Word i (a compile-time constant once unrolled) of a 16-byte chunk.
__device__ __forceinline__ unsigned word(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Transposes an 8 x 8 matrix of 16-bit elements held as MMA fragments are (lane 4 r + c holds
// elements (r, 2c) and (r, 2c + 1), the first in the low half): the lane receives (2c, r) and
// (2c + 1, r).
__device__ __forceinline__ unsigned transpose8x8(unsigned x) {
    unsigned y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
    return y;
}

// One split of a row for up to 8 query heads of one KV head, on the tensor cores: K/V of a 16-bit
// type T, heads of exactly 32 SLICES dimensions in rows that start 16-byte aligned.
//
// Lane (g, t) = (lane / 4, lane % 4) of a warp loads, for tokens g and g + 8 of a 16-token tile,
// the head's 16-byte chunks 4 p + t (p < SLICES), for K and V alike. The chunk's four words are,
// for K, the A fragments of two k-steps of S^T = K Q^T (m = token, k = dimension): the k-step of
// words 0 and 1 has k columns 2t, 2t + 1, 2t + 8, 2t + 9 at the chunk's elements 0 .. 3, that of
// words 2 and 3 at elements 4 .. 7; Q's B fragment (k = dimension, n = head g) takes the same
// words of head g's chunk 4 p + t. The accumulators S^T hold, per lane, tokens g and g + 8 for
// heads 2t and 2t + 1. For O^T = V^T P^T (m = dimension, k = token, n = head), word r of every
// lane's V chunk forms an 8 x 8 matrix (token, dimension 8 (4 p + column / 2) + 2 r + column % 2)
// whose transpose is a quarter of an A fragment: m row g stands for dimension
// 8 (4 p + g / 2) + 2 r + g % 2. P, packed as the S^T accumulators lie, transposes into the B
// fragment the same way.
template <typename T, int SLICES, int NWARPS, bool PIPELINED>
__device__ void paged_attention_mma(const T* __restrict__ q, const T* __restrict__ k_pages,
                                    const T* __restrict__ v_pages, T* __restrict__ out, float* __restrict__ scratch,
                                    const BatchLayout& layout, unsigned num_tokens,
                                    unsigned num_heads, unsigned num_kv_heads, unsigned block_size, unsigned num_blocks,
                                    float scale, unsigned prefetch_tiles) {
    static_assert(sizeof(T) == 2, "the MMA kernel takes 16-bit K/V");
    constexpr unsigned HEAD_DIM = 32 * SLICES;
    constexpr unsigned VEC = 8;
    // Query heads per block: the n dimension of the MMA.
    constexpr unsigned HEADS = 8;
    constexpr unsigned TILE = 16;

    MergeSpace<HEADS, NWARPS, HEAD_DIM>& merge = merge_space<HEADS, NWARPS, HEAD_DIM>();

    const unsigned lane = threadIdx.x & 31;
    const unsigned warp = threadIdx.x >> 5;
    const unsigned g = lane >> 2;
    const unsigned t = lane & 3;
    const BlockTask task(HEADS, num_tokens, num_heads, num_kv_heads, HEAD_DIM);
    const unsigned kv_head = task.kv_head;
    const unsigned first_head = task.first_head;
    const unsigned heads_here = task.heads_here;

    // This lane's first chunk of the KV head's row in slot 0; chunk 4 p + t is 64 p bytes further,
    // a token's row a row offset further.
    const unsigned long long lane_first = static_cast<unsigned long long>(kv_head) * HEAD_DIM + t * VEC;
    const char* k_lane = reinterpret_cast<const char*>(k_pages + lane_first);
    const char* v_lane = reinterpret_cast<const char*>(v_pages + lane_first);
    const unsigned row_bytes = num_kv_heads * HEAD_DIM * static_cast<unsigned>(sizeof(T));
    // The L2 prefetch: lane (g, t) takes token g + 8 (t % 2) of a tile, of K for t < 2 and of V
    // otherwise, and asks for the lines of the row's first and last byte (a row of 128, 192 or
    // 256 bytes at a multiple of its length spans at most two 128-byte lines).
    const char* prefetch_row = reinterpret_cast<const char*>((t < 2 ? k_pages : v_pages) +
                                                             static_cast<unsigned long long>(kv_head) * HEAD_DIM);
    const unsigned prefetch_token = g + 8 * (t & 1);
    constexpr unsigned ROW_LAST_BYTE = HEAD_DIM * sizeof(T) - 1;
    const Divisor block_divisor(block_size);
    const unsigned stride = NWARPS * TILE;
    const float log2_scale = scale * LOG2E;

    for (unsigned row = blockIdx.x; row < num_tokens; row += gridDim.x) {
        SplitWork work;
        if (start_split(layout, task, row, out, scratch, &work)) {
            const unsigned begin = work.begin;
            const unsigned end = work.end;
            const unsigned* table = work.table;

            // Head g's chunks as Q's B fragments (zero for heads past the block's). Scores are scaled
            // in f32 afterwards, so Q enters the MMA exactly as stored.
            uint4 query[SLICES];
            const T* q_head =
                q + (static_cast<unsigned long long>(row) * num_heads + first_head + g) * HEAD_DIM + t * VEC;
#pragma unroll
            for (int p = 0; p < SLICES; ++p) {
                query[p] = make_uint4(0u, 0u, 0u, 0u);
                if (g < heads_here) query[p] = load_chunk<T, false>(q_head + 32 * p, VEC);
            }
            // O^T accumulators: m-tile (p, pair) holds dimensions of words 2 pair (rows g) and
            // 2 pair + 1 (rows g + 8), heads 2t and 2t + 1.
            float acc[2 * SLICES][4];
#pragma unroll
            for (int m = 0; m < 2 * SLICES; ++m) {
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[m][i] = 0.0f;
            }
            // Heads 2t and 2t + 1: the running max (the same in every lane of the head) and this
            // lane's share of the running sum (its tokens g and g + 8).
            float run_max[2] = {NEG_INF, NEG_INF};
            float run_sum[2] = {0.0f, 0.0f};

            // Byte offset of a context token's row (that of slot 0 for a block id outside the pages,
            // which makes the result NaN); tokens past the split's end read its first row, already in
            // flight or in cache, and are masked out of the softmax.
            bool broken = false;
            auto row_offset = [&](unsigned token) {
                token = token < end ? token : begin;
                const unsigned index = block_divisor.quotient(token);
                const unsigned block = table[index];
                broken |= block >= num_blocks;
                const unsigned slot = block < num_blocks ? block * block_size + (token - index * block_size) : 0u;
                return static_cast<unsigned long long>(slot) * row_bytes;
            };

            // The arithmetic of one tile whose K and V rows are in registers.
            auto consume = [&](const uint4 (&keys)[2][SLICES], const uint4 (&values)[2][SLICES], unsigned tile) {
                const bool valid_lo = tile + g < end;
                const bool valid_hi = tile + 8 + g < end;
                // S^T = K Q^T; each chunk's two k-steps go to two accumulators, halving the chain
                // of dependent MMAs.
                float s_even[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                float s_odd[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int p = 0; p < SLICES; ++p) {
                    const unsigned first[4] = {keys[0][p].x, keys[1][p].x, keys[0][p].y, keys[1][p].y};
                    mma_16816<T>(s_even, first, query[p].x, query[p].y);
                    const unsigned second[4] = {keys[0][p].z, keys[1][p].z, keys[0][p].w, keys[1][p].w};
                    mma_16816<T>(s_odd, second, query[p].z, query[p].w);
                }
                // Scores in the log2 domain: [0], [1] token g, heads 2t, 2t + 1; [2], [3] token g + 8.
                float score[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const bool valid = i < 2 ? valid_lo : valid_hi;
                    score[i] = valid ? (s_even[i] + s_odd[i]) * log2_scale : NEG_INF;
                }
                float correction[2];
                float base[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float tile_max = fmaxf(score[e], score[2 + e]);
#pragma unroll
                    for (int offset = 4; offset < 32; offset <<= 1) {
                        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
                    }
                    const float new_max = fmaxf(run_max[e], tile_max);
                    // A head that has seen no token yet keeps a max of -inf; exponents relative to
                    // 0 then give the 0 weights its (masked) scores and empty history deserve.
                    base[e] = new_max == NEG_INF ? 0.0f : new_max;
                    correction[e] = fast_exp2(run_max[e] - base[e]);
                    run_max[e] = new_max;
                }
                float weight[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) weight[i] = fast_exp2(score[i] - base[i & 1]);
#pragma unroll
                for (int e = 0; e < 2; ++e) run_sum[e] = run_sum[e] * correction[e] + weight[e] + weight[2 + e];
#pragma unroll
                for (int m = 0; m < 2 * SLICES; ++m) {
#pragma unroll
                    for (int i = 0; i < 4; ++i) acc[m][i] *= correction[i & 1];
                }
                // P^T as B fragments: tokens 2t, 2t + 1 (and 8 more) of head g.
                const unsigned p_lo = transpose8x8(pack2<T>(weight[0], weight[1]));
                const unsigned p_hi = transpose8x8(pack2<T>(weight[2], weight[3]));
#pragma unroll
                for (int p = 0; p < SLICES; ++p) {
#pragma unroll
                    for (int pair = 0; pair < 2; ++pair) {
                        const unsigned a[4] = {transpose8x8(word(values[0][p], 2 * pair)),
                                               transpose8x8(word(values[0][p], 2 * pair + 1)),
                                               transpose8x8(word(values[1][p], 2 * pair)),
                                               transpose8x8(word(values[1][p], 2 * pair + 1))};
                        mma_16816<T>(acc[2 * p + pair], a, p_lo, p_hi);
                    }
                }
            };

            // Stream this warp's tiles of the split. The loop bounds depend on the warp only, so
            // every lane reaches the shuffles and the warp-wide MMAs.
            unsigned tile = begin + warp * TILE;
            unsigned long long offset_lo = row_offset(tile + g);
            unsigned long long offset_hi = row_offset(tile + 8 + g);
            // The loads of the tile whose rows are at offset_lo and offset_hi.
            auto load_tile = [&](uint4 (&keys)[2][SLICES], uint4 (&values)[2][SLICES]) {
#pragma unroll
                for (int p = 0; p < SLICES; ++p) {
                    keys[0][p] = load_stream(k_lane + offset_lo + 64 * p);
                    keys[1][p] = load_stream(k_lane + offset_hi + 64 * p);
                }
#pragma unroll
                for (int p = 0; p < SLICES; ++p) {
                    values[0][p] = load_stream(v_lane + offset_lo + 64 * p);
                    values[1][p] = load_stream(v_lane + offset_hi + 64 * p);
                }
            };
            // Tiles past the one computed that the L2 prefetch reaches: prefetch_tiles past the
            // one loaded, which the pipelined form loads a tile ahead.
            const unsigned lead = prefetch_tiles + (PIPELINED ? 1 : 0);
            // The first tiles' prefetches, their lookups issued together.
#pragma unroll
            for (unsigned ahead = 0; ahead <= MAX_PREFETCH_TILES; ++ahead) {
                if (ahead < lead) {
                    const unsigned long long at = row_offset(tile + ahead * stride + prefetch_token);
                    prefetch_l2(prefetch_row + at);
                    prefetch_l2(prefetch_row + at + ROW_LAST_BYTE);
                }
            }
            unsigned long long prefetch_offset = row_offset(tile + lead * stride + prefetch_token);
            // The prefetch `lead` tiles past `tile`, then the lookups of the next (loads and
            // prefetch), while this tile computes.
            auto prefetch_and_look_up = [&](unsigned next_load) {
                prefetch_l2(prefetch_row + prefetch_offset);
                prefetch_l2(prefetch_row + prefetch_offset + ROW_LAST_BYTE);
                offset_lo = row_offset(next_load + g);
                offset_hi = row_offset(next_load + 8 + g);
                prefetch_offset = row_offset(tile + (lead + 1) * stride + prefetch_token);
            };
            if constexpr (PIPELINED) {
                // Two register buffers: a tile's loads are issued a tile before its arithmetic,
                // so a warp has two tiles in flight instead of one. The last step loads a tile
                // past the split, the split's first row again.
                if (tile < end) {
                    uint4 keys_a[2][SLICES];
                    uint4 values_a[2][SLICES];
                    uint4 keys_b[2][SLICES];
                    uint4 values_b[2][SLICES];
                    load_tile(keys_a, values_a);
                    offset_lo = row_offset(tile + stride + g);
                    offset_hi = row_offset(tile + stride + 8 + g);
                    while (true) {
                        load_tile(keys_b, values_b);
                        prefetch_and_look_up(tile + 2 * stride);
                        consume(keys_a, values_a, tile);
                        tile += stride;
                        if (tile >= end) break;
                        load_tile(keys_a, values_a);
                        prefetch_and_look_up(tile + 2 * stride);
                        consume(keys_b, values_b, tile);
                        tile += stride;
                        if (tile >= end) break;
                    }
                }
            } else {
                for (; tile < end; tile += stride) {
                    uint4 keys[2][SLICES];
                    uint4 values[2][SLICES];
                    load_tile(keys, values);
                    prefetch_and_look_up(tile + stride);
                    consume(keys, values, tile);
                }
            }

            // The sums over the head's lanes, then each warp's statistics and values to the block.
#pragma unroll
            for (int e = 0; e < 2; ++e) {
#pragma unroll
                for (int offset = 4; offset < 32; offset <<= 1) {
                    run_sum[e] += __shfl_xor_sync(0xffffffffu, run_sum[e], offset);
                }
            }
#pragma unroll
            for (int p = 0; p < SLICES; ++p) {
#pragma unroll
                for (int pair = 0; pair < 2; ++pair) {
                    const unsigned dim = 8 * (4 * p + g / 2) + 4 * pair + (g & 1);
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const unsigned head = 2 * t + e;
                        merge.values[warp][head][dim] = acc[2 * p + pair][e];
                        merge.values[warp][head][dim + 2] = acc[2 * p + pair][2 + e];
                    }
                }
            }
            if (g == 0) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    merge.max[warp][2 * t + e] = run_max[e];
                    merge.sum[warp][2 * t + e] = run_sum[e];
                }
            }
            const bool is_broken = __syncthreads_or(broken) != 0;
            write_split<T, HEADS, NWARPS, HEAD_DIM>(merge, is_broken, out, scratch, row, task);
            // The shared statistics are overwritten by the next row.
            __syncthreads();
        }
    }
}

// Merges the splits of one (row, head): every split's values scaled by exp2(its max - the overall
// max), divided by the equally scaled sum of the splits' sums. Splits that held no token have a
// max of -inf and weigh nothing; their values, never written, are not used (a select, not a
// product, so unwritten memory cannot leak in). V consecutive dimensions per thread (16-byte loads
// for V = 4), the block's threads spread over the splits so that all of a row's loads are in
// flight at once.
template <typename T, int V>
__device__ void paged_attention_combine(const float* __restrict__ scratch, T* __restrict__ out, unsigned num_tokens,
                                        unsigned num_heads, unsigned head_dim, unsigned num_splits) {
    __shared__ float weights[MAX_SPLITS];
    __shared__ float partial[COMBINE_THREADS * V];
    const unsigned head = blockIdx.y;
    const unsigned lanes = (head_dim + V - 1) / V;
    const unsigned groups = max(1u, COMBINE_THREADS / lanes);
    const unsigned lane = threadIdx.x % lanes;
    const unsigned group = threadIdx.x / lanes;
    const SplitScratch parts(const_cast<float*>(scratch), num_tokens, num_heads, num_splits, head_dim);
    for (unsigned row = blockIdx.x; row < num_tokens; row += gridDim.x) {
        const unsigned long long first = parts.index(row, head, 0, num_heads, num_splits);
        const float* stats = parts.stats + 2 * first;
        float max = NEG_INF;
        for (unsigned s = threadIdx.x; s < num_splits; s += blockDim.x) max = fmaxf(max, stats[2 * s]);
        max = block_max(max);
        float sum = 0.0f;
        for (unsigned s = threadIdx.x; s < num_splits; s += blockDim.x) {
            const float split_max = stats[2 * s];
            const float weight = split_max == NEG_INF ? 0.0f : exp2f(split_max - max);
            weights[s] = weight;
            sum += stats[2 * s + 1] * weight;
        }
        // block_sum synchronises the block after every weight is written.
        const float inv_sum = 1.0f / block_sum(sum);
        float value[V];
#pragma unroll
        for (int i = 0; i < V; ++i) value[i] = 0.0f;
        if (group < groups && lane * V < head_dim) {
            const float* values = parts.values + first * head_dim + lane * V;
#pragma unroll 4
            for (unsigned s = group; s < num_splits; s += groups) {
                const float weight = weights[s];
                float part[V];
                if constexpr (V == 4) {
                    const float4 four =
                        *reinterpret_cast<const float4*>(values + static_cast<unsigned long long>(s) * head_dim);
                    part[0] = four.x;
                    part[1] = four.y;
                    part[2] = four.z;
                    part[3] = four.w;
                } else {
#pragma unroll
                    for (int i = 0; i < V; ++i) part[i] = values[static_cast<unsigned long long>(s) * head_dim + i];
                }
#pragma unroll
                for (int i = 0; i < V; ++i) value[i] += weight != 0.0f ? part[i] * weight : 0.0f;
            }
#pragma unroll
            for (int i = 0; i < V; ++i) partial[group * head_dim + lane * V + i] = value[i];
        }
        __syncthreads();
        T* out_row = out + (static_cast<unsigned long long>(row) * num_heads + head) * head_dim;
        for (unsigned d = threadIdx.x; d < head_dim; d += blockDim.x) {
            float total = 0.0f;
            for (unsigned grp = 0; grp < groups; ++grp) total += partial[grp * head_dim + d];
            out_row[d] = from_float<T>(total * inv_sum);
        }
        // The weights and partial sums are overwritten by the next row.
        __syncthreads();
    }
}

}  // namespace

// q, out [num_tokens, num_heads, head_dim]; k_pages, v_pages [num_blocks, block_size, num_kv_heads,
// head_dim]; scratch f32 [num_tokens, num_heads, num_splits, head_dim + 2] (unused with one split);
// query_start [num_seqs + 1] (cumulative, query_start[num_seqs] = num_tokens); context_len
// [num_seqs]; block_tables [num_seqs, max_blocks]. Grid (rows, num_kv_heads * ceil(group / GROUP),
// num_splits <= MAX_SPLITS); each sequence cuts its context into num_splits splits by
// split_range().
//
// paged_attention_g<GROUP>: WARPS warps per block, head_dim <= 256, up to GROUP query heads per KV
// head in one block. Blocks each SM must be able to hold, which caps the registers a thread may
// use: four (16 warps, 128 registers) for 16-bit groups of up to 3 heads, three for groups of 4,
// whose queries and accumulators would spill at 128; no cap for f32 and groups of 8, which hold
// twice the values.
#define MIN_BLOCKS(T, GROUP) (sizeof(T) == 4 ? 1 : (GROUP) <= 3 ? 4 : (GROUP) == 4 ? 3 : 1)

#define PAGODA_PAGED_ATTENTION_GROUP(SUFFIX, T, GROUP)                                                              \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS(T, GROUP)) paged_attention_g##GROUP##_##SUFFIX( \
        const T* __restrict__ q, const T* __restrict__ k_pages, const T* __restrict__ v_pages, T* __restrict__ out,  \
        float* __restrict__ scratch, const unsigned* __restrict__ query_start,                                       \
        const unsigned* __restrict__ context_len, const unsigned* __restrict__ block_tables, unsigned num_seqs,      \
        unsigned max_blocks, unsigned num_tokens, unsigned num_heads, unsigned num_kv_heads, unsigned head_dim,      \
        unsigned block_size, unsigned num_blocks, float scale) {                                                     \
        allow_dependent_launch();                                                                                    \
        const BatchLayout layout{query_start, context_len, block_tables, num_seqs, max_blocks};                      \
        /* 16-byte loads (and L2 prefetches) when the rows allow them, element loads otherwise. */                  \
        if (head_dim % (16 / sizeof(T)) == 0 && is_aligned16(k_pages) && is_aligned16(v_pages)) {                   \
            paged_attention_fma<T, GROUP, true>(q, k_pages, v_pages, out, scratch, layout, num_tokens,     \
                                                num_heads, num_kv_heads, head_dim, block_size, num_blocks, scale);   \
        } else {                                                                                                     \
            paged_attention_fma<T, GROUP, false>(q, k_pages, v_pages, out, scratch, layout, num_tokens,    \
                                                 num_heads, num_kv_heads, head_dim, block_size, num_blocks, scale);  \
        }                                                                                                            \
    }

// paged_attention_mma_d<DIM>_w<NWARPS>_b<MIN><NAME>: 16-bit K/V, head_dim == DIM, pages 16-byte
// aligned, NWARPS warps per block, up to 8 query heads per KV head in one block, prefetch_tiles <=
// MAX_PREFETCH_TILES; NAME is _pl for the pipelined loop (PIPE), nothing otherwise.
#define PAGODA_PAGED_ATTENTION_MMA(SUFFIX, T, DIM, NWARPS, MIN, NAME, PIPE)                                          \
    extern "C" __global__ void __launch_bounds__(NWARPS * 32, MIN)                                                   \
        paged_attention_mma_d##DIM##_w##NWARPS##_b##MIN##NAME##_##SUFFIX(                                            \
            const T* __restrict__ q, const T* __restrict__ k_pages, const T* __restrict__ v_pages,                   \
            T* __restrict__ out, float* __restrict__ scratch, const unsigned* __restrict__ query_start,              \
            const unsigned* __restrict__ context_len, const unsigned* __restrict__ block_tables, unsigned num_seqs,  \
            unsigned max_blocks, unsigned num_tokens, unsigned num_heads, unsigned num_kv_heads,                     \
            unsigned block_size, unsigned num_blocks, float scale, unsigned prefetch_tiles) {                        \
        allow_dependent_launch();                                                                                    \
        const BatchLayout layout{query_start, context_len, block_tables, num_seqs, max_blocks};                      \
        paged_attention_mma<T, (DIM) / 32, NWARPS, PIPE>(q, k_pages, v_pages, out, scratch, layout, num_tokens,     \
                                                         num_heads, num_kv_heads, block_size, num_blocks, scale,    \
                                                         prefetch_tiles);                                           \
    }

#define PAGODA_PAGED_ATTENTION_KERNELS(SUFFIX, T)                                                                     \
    PAGODA_PAGED_ATTENTION_GROUP(SUFFIX, T, 1)                                                                       \
    PAGODA_PAGED_ATTENTION_GROUP(SUFFIX, T, 2)                                                                       \
    PAGODA_PAGED_ATTENTION_GROUP(SUFFIX, T, 3)                                                                       \
    PAGODA_PAGED_ATTENTION_GROUP(SUFFIX, T, 4)                                                                       \
    PAGODA_PAGED_ATTENTION_GROUP(SUFFIX, T, 8)                                                                       \
    /* Grid (rows, num_heads), COMBINE_THREADS threads; waits for the split kernel before it reads. */              \
    extern "C" __global__ void __launch_bounds__(COMBINE_THREADS) paged_attention_combine_##SUFFIX(                  \
        const float* __restrict__ scratch, T* __restrict__ out, unsigned num_tokens, unsigned num_heads,             \
        unsigned head_dim, unsigned num_splits) {                                                                    \
        wait_for_prior_kernels();                                                                                    \
        if (head_dim % 4 == 0) {                                                                                     \
            paged_attention_combine<T, 4>(scratch, out, num_tokens, num_heads, head_dim, num_splits);                \
        } else {                                                                                                     \
            paged_attention_combine<T, 1>(scratch, out, num_tokens, num_heads, head_dim, num_splits);                \
        }                                                                                                            \
    }

PAGODA_FOR_EACH_FLOAT(PAGODA_PAGED_ATTENTION_KERNELS)

// The forms compiled. For 128 dimensions: four warps with registers capped for four blocks per SM
// (the default when contexts are not split) or three; the pipelined loop (_pl) with four warps and
// two blocks per SM (the default when they are) or eight warps and one. One form for 64 and 96.
#define PAGODA_PAGED_ATTENTION_MMA_FORMS(SUFFIX, T)                                                                   \
    PAGODA_PAGED_ATTENTION_MMA(SUFFIX, T, 64, 4, 3, , false)                                                         \
    PAGODA_PAGED_ATTENTION_MMA(SUFFIX, T, 96, 4, 3, , false)                                                         \
    PAGODA_PAGED_ATTENTION_MMA(SUFFIX, T, 128, 4, 4, , false)                                                        \
    PAGODA_PAGED_ATTENTION_MMA(SUFFIX, T, 128, 4, 3, , false)                                                        \
    PAGODA_PAGED_ATTENTION_MMA(SUFFIX, T, 128, 4, 2, _pl, true)                                                      \
    PAGODA_PAGED_ATTENTION_MMA(SUFFIX, T, 128, 8, 1, _pl, true)

PAGODA_PAGED_ATTENTION_MMA_FORMS(f16, half_t)
PAGODA_PAGED_ATTENTION_MMA_FORMS(bf16, bf16_t)
