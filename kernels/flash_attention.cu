// Flash attention for prefill over the paged KV cache: for every query row of a flat batch and
// every head, softmax(scale * q . k) over the row's sequence's keys, times the values, with K/V read
// through the sequence's block table (crates/pagoda-kernels/src/cpu/attention.rs is the oracle).
// Query row i of a sequence with query_len rows and context_len tokens of context sits at position
// context_len - query_len + i; causally it sees keys 0..=position, so a chunk of a long prompt, or a
// prompt whose prefix came from the prefix cache, attends to the context already in the pages.
// Without the causal mask every row sees the sequence's whole context.
//
// The FlashAttention-2 forward scheme (Dao, 2023): a thread block owns BLOCK_M query rows and walks
// the keys in tiles of BLOCK_N, keeping each row's running max and sum (f32) and its output
// accumulator (f32) in registers, so the scores never leave the SM.
// - Grouped-query attention is packed into the rows: block row r is query token r / G, head
//   kv_head * G + r % G (G = num_heads / num_kv_heads). Every K/V tile a block loads serves the
//   whole query group, so a group of G heads reads the cache once instead of G times, and the
//   causal diagonal is cut at token granularity (a tile holds BLOCK_M / G tokens).
// - Tensor cores through mma.sync m16n8k16 (f16 or bf16 in, f32 accumulate). Each warp owns
//   16 * M_REPS rows: with M_REPS = 2 every K/V fragment it reads from shared memory feeds two MMAs,
//   halving the shared-memory traffic per MMA (ldmatrix bandwidth is close to the MMA rate here).
// - Q is staged in shared memory once and read with ldmatrix for every tile (holding it in
//   registers beside a 16 x 2 x head_dim f32 accumulator would spill); K with ldmatrix, V with
//   ldmatrix.trans, P (the exponentiated scores) reused from the score accumulators as the A
//   operand of the second MMA without a trip through shared memory.
// - K/V tiles are gathered from the pages with 16-byte cp.async copies, two stages deep: the copies
//   of tile j + 1 are issued after the barrier that opens tile j, so they run under tile j's
//   arithmetic, and one barrier per tile suffices. Key rows past the context are zero-filled (a
//   masked key must contribute 0 * v, and stale shared memory could hold NaN). SCHEDULE (below)
//   chooses where in tile j those copies are issued.
// - Once a row's running max stops changing its rescale factor is exactly 1; a warp whose factors
//   are all 1 skips rescaling its accumulators, which after the first tiles is the common case.
// - Shared-memory rows are padded by 16 bytes: a row is (head_dim + 8) * 2 bytes, an odd number of
//   16-byte units for every supported head_dim, so the 8 rows one ldmatrix phase reads fall in 8
//   different bank groups (no conflicts) while every row stays 16-byte aligned for cp.async.
// - Softmax in base 2: exp(scale * (s - m)) = exp2(s * scale_log2 - m * scale_log2), one FFMA and
//   one MUFU.EX2 per score. The running max is kept unscaled (scale > 0, checked by the host).
// - Work is cut into (query tile, kv head) blocks on a 1-D grid, heaviest causal tiles first so the
//   short ones fill the tail. Sequence s's tiles start at floor(query_start[s] * G / BLOCK_M) + s:
//   that leaves at least ceil(query_len * G / BLOCK_M) slots per sequence (blocks past a sequence's
//   rows exit at once), and the host needs no per-sequence information to size the grid.
//
// TMA (cp.async.bulk.tensor) is not used: a K/V tile is BLOCK_N rows gathered from as many pages as
// the block table names (one per block_size tokens, in any order), which a tensor map cannot
// describe; the per-row cp.async gather is what the paging costs.
//
// On sm_90a the head dimensions of whole 64-column blocks have a second kernel on warpgroup MMAs
// (wgmma), flash_attention_wgmma at the end of this file: the same work split, gather and softmax,
// with the tiles in shared memory swizzled for wgmma's descriptors.
//
// The batch layout is validated on the host when it is built; a block id outside the pages is
// still never read (its rows are zero-filled) and makes the block's rows NaN.

#include "common.cuh"
#include "mma.cuh"

namespace {

#define QUIET_NAN __int_as_float(0x7fc00000)

// ---------------------------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ unsigned shared_address(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes from global to shared memory, bypassing L1; `bytes` = 0 writes 16 zero bytes instead.
__device__ __forceinline__ void cp_async_16(unsigned dst, const void* src, unsigned bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's commit groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address)
                 : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], unsigned address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address)
                 : "memory");
}

// 2^x on the special-function unit (relative error ~2^-22; -inf gives +0).
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// n / d and n % d for a divisor fixed per launch (the block size), without a division
// instruction: q = (umulhi(n, mul) + n) >> shift with mul = floor(2^32 * (2^shift - d) / d) + 1 and
// shift = ceil(log2 d) (Granlund and Montgomery, "Division by invariant integers using
// multiplication", 1994, section 4), exact for every 32-bit n. The host computes mul and shift.
struct FastDivisor {
    unsigned divisor;
    unsigned mul;
    unsigned shift;

    __device__ __forceinline__ unsigned div(unsigned n) const {
        return static_cast<unsigned>((static_cast<unsigned long long>(__umulhi(n, mul)) + n) >> shift);
    }
};

// ---------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------

struct Problem {
    const unsigned* __restrict__ query_start;
    const unsigned* __restrict__ context_len;
    const unsigned* __restrict__ block_tables;
    unsigned num_seqs;
    unsigned max_blocks;
    unsigned num_heads;
    unsigned num_kv_heads;
    // num_heads / num_kv_heads: query heads per kv head.
    FastDivisor group;
    FastDivisor block_size;
    unsigned num_blocks;
    unsigned total_tiles;
    float scale_log2;
    bool causal;
};

// The block of work a thread block owns: BLOCK_M packed rows of one sequence, for one kv head.
struct WorkTile {
    unsigned kv_head;
    unsigned seq;
    // The sequence's first query token, and its packed rows (query tokens x G).
    unsigned q_begin;
    unsigned rows;
    // The tile's first packed row.
    unsigned row0;
    unsigned context;
    // The position of the sequence's first query token.
    unsigned first_position;
    // Keys the tile reads, and the first key some row of the tile must not see.
    unsigned kv_end;
    unsigned mask_from;
    unsigned num_kv_tiles;
    const unsigned* table;
};

// Which (query tile, kv head) this block owns, counting tiles from the end so the heaviest causal
// tiles start first; false for a tile past its sequence's rows (the block has nothing to do).
template <int BLOCK_M, int BLOCK_N>
__device__ __forceinline__ bool locate_work(const Problem& p, WorkTile& w) {
    w.kv_head = blockIdx.x / p.total_tiles;
    const unsigned tile = p.total_tiles - 1 - blockIdx.x % p.total_tiles;
    const unsigned group = p.group.divisor;
    auto tile_start = [&](unsigned s) {
        return static_cast<unsigned>(static_cast<unsigned long long>(p.query_start[s]) * group / BLOCK_M) + s;
    };
    unsigned lo = 0;
    unsigned hi = p.num_seqs;
    while (hi - lo > 1) {
        const unsigned mid = (lo + hi) / 2;
        if (tile_start(mid) <= tile) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    w.seq = lo;
    w.q_begin = p.query_start[w.seq];
    const unsigned query_len = p.query_start[w.seq + 1] - w.q_begin;
    w.rows = query_len * group;
    w.row0 = (tile - tile_start(w.seq)) * BLOCK_M;
    if (w.row0 >= w.rows) return false;
    w.context = p.context_len[w.seq];
    w.first_position = w.context - query_len;
    const unsigned rows_end = min(w.row0 + BLOCK_M, w.rows);
    w.kv_end = p.causal ? w.first_position + p.group.div(rows_end - 1) + 1 : w.context;
    w.mask_from = p.causal ? w.first_position + p.group.div(w.row0) + 1 : w.context;
    w.num_kv_tiles = (w.kv_end + BLOCK_N - 1) / BLOCK_N;
    w.table = p.block_tables + static_cast<unsigned long long>(w.seq) * p.max_blocks;
    return true;
}

// Byte offset of 16-byte chunk `chunk` of row `r` in a tile of ROWS rows laid out for wgmma with
// the 128-byte swizzle (PTX ISA, "Shared memory matrix layout"): the head is cut into blocks of 64
// elements (one 128-byte row each), block b of all ROWS rows stored together, and within each
// 8-row group of 1024 bytes the chunk index is XORed with the row's index in the group, so the 8
// rows an MMA reads at one column fall in 8 different bank groups. The tile must start 1024-byte
// aligned (the hardware applies the XOR to address bits 4-6 from bits 7-9).
template <int ROWS> __device__ __forceinline__ unsigned swizzled_offset(unsigned r, unsigned chunk) {
    return (chunk >> 3) * (ROWS * 128u) + r * 128u + (((chunk & 7u) ^ (r & 7u)) << 4);
}

// Copies K/V tiles from the pages into shared memory with cp.async: key row r of tile j is token
// j * BLOCK_N + r, found through the block table. With a head of a multiple of 8 chunks, 8
// consecutive threads copy 8 consecutive chunks of one row (one 128-byte global segment, 8
// different bank groups in shared memory) and a thread keeps its row for all of that row's chunks,
// so it looks the row up once; otherwise THREADS_PER_ROW threads share a row, taking its chunks in
// turn. SWIZZLED picks the wgmma layout (swizzled_offset) over padded rows of (HEAD_DIM + 8)
// elements.
template <typename T, int HEAD_DIM, int BLOCK_N, int THREADS, bool SWIZZLED> struct KvGather {
    static constexpr int CHUNKS = HEAD_DIM / 8;
    static constexpr bool WHOLE_GROUPS = CHUNKS % 8 == 0;
    static constexpr int ROWS_PER_PASS = WHOLE_GROUPS ? THREADS / 8 : BLOCK_N;
    static constexpr int THREADS_PER_ROW = WHOLE_GROUPS ? 8 : THREADS / BLOCK_N;
    static constexpr int ROWS_PER_THREAD = BLOCK_N / ROWS_PER_PASS;
    static constexpr int CHUNKS_PER_THREAD = CHUNKS / THREADS_PER_ROW;
    static constexpr int ROW_BYTES = (HEAD_DIM + 8) * 2;
    static_assert(BLOCK_N % ROWS_PER_PASS == 0 && THREADS == ROWS_PER_PASS * THREADS_PER_ROW &&
                      CHUNKS % THREADS_PER_ROW == 0,
                  "K/V rows split evenly over the threads");

    const Problem& p;
    const WorkTile& w;
    const T* k_head;
    const T* v_head;
    unsigned long long token_stride;
    int row_in_pass;
    int first_chunk;
    // A block id outside the pages was met (its rows were zero-filled).
    bool broken;

    __device__ __forceinline__ KvGather(const Problem& problem, const WorkTile& work, const T* k_pages,
                                        const T* v_pages, int tid)
        : p(problem),
          w(work),
          k_head(k_pages + work.kv_head * HEAD_DIM),
          v_head(v_pages + work.kv_head * HEAD_DIM),
          token_stride(static_cast<unsigned long long>(problem.num_kv_heads) * HEAD_DIM),
          row_in_pass(tid / THREADS_PER_ROW),
          first_chunk(tid % THREADS_PER_ROW),
          broken(false) {}

    // The block ids of this thread's rows of tile j (loads only, so their latency can hide behind
    // other work before `issue` uses them). Rows past kv_end read the table's first entry, which
    // every sequence with rows has, and are not copied.
    __device__ __forceinline__ void fetch_ids(unsigned j, unsigned (&ids)[ROWS_PER_THREAD]) const {
#pragma unroll
        for (int i = 0; i < ROWS_PER_THREAD; ++i) {
            const unsigned token = j * BLOCK_N + i * ROWS_PER_PASS + row_in_pass;
            ids[i] = w.table[token < w.kv_end ? p.block_size.div(token) : 0];
        }
    }

    // Copies this thread's share of tile j: K to the stage at `k_dst` if `with_k`, V to `v_dst` if
    // `with_v` (callers pass constants for the flags). Rows past kv_end, and rows whose block id
    // is outside the pages, are zero-filled: a masked key must contribute 0 * v, and stale shared
    // memory could hold NaN.
    __device__ __forceinline__ void issue(unsigned j, const unsigned (&ids)[ROWS_PER_THREAD], bool with_k,
                                          unsigned k_dst, bool with_v, unsigned v_dst) {
#pragma unroll
        for (int i = 0; i < ROWS_PER_THREAD; ++i) {
            const int r = i * ROWS_PER_PASS + row_in_pass;
            const unsigned token = j * BLOCK_N + r;
            const bool in_context = token < w.kv_end;
            const bool valid = in_context && ids[i] < p.num_blocks;
            broken |= in_context && !valid;
            const unsigned in_block = token - p.block_size.div(token) * p.block_size.divisor;
            const unsigned long long offset =
                valid ? (static_cast<unsigned long long>(ids[i]) * p.block_size.divisor + in_block) * token_stride : 0;
            const unsigned bytes = valid ? 16u : 0u;
#pragma unroll
            for (int u = 0; u < CHUNKS_PER_THREAD; ++u) {
                const int chunk = first_chunk + THREADS_PER_ROW * u;
                const unsigned dst = SWIZZLED ? swizzled_offset<BLOCK_N>(r, chunk) : r * ROW_BYTES + chunk * 16;
                if (with_k) cp_async_16(k_dst + dst, k_head + offset + chunk * 8, bytes);
                if (with_v) cp_async_16(v_dst + dst, v_head + offset + chunk * 8, bytes);
            }
        }
    }

    __device__ __forceinline__ void load(unsigned j, bool with_k, unsigned k_dst, bool with_v, unsigned v_dst) {
        unsigned ids[ROWS_PER_THREAD];
        fetch_ids(j, ids);
        issue(j, ids, with_k, k_dst, with_v, v_dst);
    }
};

// HEAD_DIM: the head dimension (a multiple of 16). M_REPS x 16 rows per warp, WARPS warps, so
// BLOCK_M = 16 * M_REPS * WARPS query rows per block; BLOCK_N keys per tile (a multiple of 16).
// How a block orders its copies and MMAs (the kernel name's suffix): LOADS_FIRST (none) issues the
// copies of the next tile before the scores of this one; LOADS_LATE (l) reads the next tile's block
// ids first but issues its copies after this tile's score MMAs; PIPELINED (p) also issues the next
// tile's score MMAs before this tile's softmax, holding two score tiles in registers.
// WGMMA (g) selects the sm_90a kernel further down (flash_attention_wgmma: M_REPS 1, WARPS a
// multiple of 4).
constexpr int LOADS_FIRST = 0;
constexpr int LOADS_LATE = 1;
constexpr int PIPELINED = 2;
constexpr int WGMMA = 3;

template <typename T, int HEAD_DIM, int M_REPS, int WARPS, int BLOCK_N, int SCHEDULE>
__device__ __forceinline__ void flash_attention(const T* __restrict__ q, const T* __restrict__ k_pages,
                                                const T* __restrict__ v_pages, T* __restrict__ out,
                                                const Problem& p) {
    static_assert(HEAD_DIM % 16 == 0 && BLOCK_N % 16 == 0, "MMA tiles are 16 wide");
    constexpr int THREADS = WARPS * 32;
    constexpr int BLOCK_M = 16 * M_REPS * WARPS;
    constexpr int WARP_ROWS = 16 * M_REPS;
    // Elements per shared-memory row: the head plus 16 bytes of padding (see the top of the file).
    constexpr int STRIDE = HEAD_DIM + 8;
    constexpr int ROW_BYTES = STRIDE * 2;
    // 16-byte chunks per head row, and chunks each thread copies per Q tile.
    constexpr int CHUNKS = HEAD_DIM / 8;
    static_assert((BLOCK_M * CHUNKS) % THREADS == 0, "Q tiles split evenly over the threads");
    constexpr int Q_COPIES = BLOCK_M * CHUNKS / THREADS;
    constexpr int N_TILES = BLOCK_N / 8;   // n8 score tiles per row block
    constexpr int D_TILES = HEAD_DIM / 8;  // n8 output tiles per row block

    extern __shared__ __align__(16) unsigned char shared[];
    T* q_tile = reinterpret_cast<T*>(shared);
    const unsigned q_base = shared_address(shared);
    const unsigned k_base = q_base + BLOCK_M * ROW_BYTES;
    const unsigned v_base = k_base + 2 * BLOCK_N * ROW_BYTES;
    constexpr unsigned KV_STAGE_BYTES = BLOCK_N * ROW_BYTES;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;

    WorkTile w;
    if (!locate_work<BLOCK_M, BLOCK_N>(p, w)) return;
    const unsigned kv_head = w.kv_head;
    const unsigned group = p.group.divisor;
    const unsigned q_begin = w.q_begin;
    const unsigned rows = w.rows;
    const unsigned row0 = w.row0;
    const unsigned num_kv_tiles = w.num_kv_tiles;
    const unsigned mask_from = w.mask_from;
    const unsigned long long q_token_stride = static_cast<unsigned long long>(p.num_heads) * HEAD_DIM;

    // Q tile: row r is token (row0 + r) / G, head kv_head * G + (row0 + r) % G; rows past the
    // sequence are zero-filled.
#pragma unroll
    for (int c = 0; c < Q_COPIES; ++c) {
        const int i = tid + c * THREADS;
        const int r = i / CHUNKS;
        const int chunk = i % CHUNKS;
        const unsigned row = row0 + r;
        const bool valid = row < rows;
        const unsigned token = valid ? p.group.div(row) : 0;
        const unsigned head = kv_head * group + (valid ? row - token * group : 0);
        const T* src = q + (q_begin + token) * q_token_stride + head * HEAD_DIM + chunk * 8;
        cp_async_16(q_base + r * ROW_BYTES + chunk * 16, src, valid ? 16u : 0u);
    }

    using Gather = KvGather<T, HEAD_DIM, BLOCK_N, THREADS, false>;
    Gather gather(p, w, k_pages, v_pages, tid);
    constexpr int ROWS_PER_THREAD = Gather::ROWS_PER_THREAD;
    auto load_tile = [&](unsigned j, bool with_k, unsigned k_dst, bool with_v, unsigned v_dst) {
        gather.load(j, with_k, k_dst, with_v, v_dst);
    };
    auto k_stage = [&](unsigned j) { return k_base + (j & 1) * KV_STAGE_BYTES; };
    auto v_stage = [&](unsigned j) { return v_base + (j & 1) * KV_STAGE_BYTES; };

    // This thread's rows in the MMA fragments: for rep m and half h, block row
    // warp * WARP_ROWS + m * 16 + lane / 4 + 8 h. A key k is visible to it when k < limit.
    unsigned limit[M_REPS][2];
#pragma unroll
    for (int m = 0; m < M_REPS; ++m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const unsigned row = row0 + warp * WARP_ROWS + m * 16 + (lane >> 2) + 8 * h;
            if (row >= rows) {
                limit[m][h] = 0;
            } else {
                limit[m][h] = p.causal ? w.first_position + p.group.div(row) + 1 : w.context;
            }
        }
    }

    // Per-lane ldmatrix offsets (bytes). Q (A operand): lanes 0-15 address rows 0-15 at column 0,
    // lanes 16-31 the same rows at column 8. K (B operand, keys as rows): lanes 0-7 keys 0-7 at
    // column 0, 8-15 keys 0-7 at column 8, 16-23 keys 8-15 at column 0, 24-31 keys 8-15 at column 8,
    // giving (b0, b1) of two n8 tiles. V (B operand through .trans): lanes 0-15 keys 0-15 at
    // dimension 0, lanes 16-31 keys 0-15 at dimension 8, giving (b0, b1) of two n8 tiles.
    const unsigned q_lane = q_base + (warp * WARP_ROWS + (lane & 15)) * ROW_BYTES + (lane >> 4) * 16;
    const unsigned k_lane = ((lane & 7) + ((lane >> 4) << 3)) * ROW_BYTES + ((lane >> 3) & 1) * 16;
    const unsigned v_lane = (lane & 15) * ROW_BYTES + (lane >> 4) * 16;

    float acc[M_REPS][D_TILES][4];
    float row_max[M_REPS][2];
    float row_sum[M_REPS][2];
#pragma unroll
    for (int m = 0; m < M_REPS; ++m) {
#pragma unroll
        for (int d = 0; d < D_TILES; ++d) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[m][d][e] = 0.0f;
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            row_max[m][h] = NEG_INF;
            row_sum[m][h] = 0.0f;
        }
    }
    const float scale_log2 = p.scale_log2;

    // S = Q K^T for this warp's rows and the BLOCK_N keys of the K stage at `k_tile`.
    auto compute_scores = [&](float (&s)[M_REPS][N_TILES][4], unsigned k_tile) {
#pragma unroll
        for (int m = 0; m < M_REPS; ++m) {
#pragma unroll
            for (int n = 0; n < N_TILES; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) s[m][n][e] = 0.0f;
            }
        }
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
            unsigned a[M_REPS][4];
#pragma unroll
            for (int m = 0; m < M_REPS; ++m) ldmatrix_x4(a[m], q_lane + m * 16 * ROW_BYTES + kk * 32);
#pragma unroll
            for (int nn = 0; nn < BLOCK_N / 16; ++nn) {
                unsigned b[4];
                ldmatrix_x4(b, k_tile + k_lane + nn * 16 * ROW_BYTES + kk * 32);
#pragma unroll
                for (int m = 0; m < M_REPS; ++m) {
                    mma_16816<T>(s[m][2 * nn], a[m], b[0], b[1]);
                    mma_16816<T>(s[m][2 * nn + 1], a[m], b[2], b[3]);
                }
            }
        }
    };

    // Masks tile j's scores, folds them into the running softmax and adds P V (V stage at
    // `v_tile`) to the accumulators.
    auto accumulate = [&](float (&s)[M_REPS][N_TILES][4], unsigned j, unsigned v_tile) {
        // Keys past a row's limit (the causal diagonal, the end of the context) score -inf.
        const unsigned kv0 = j * BLOCK_N;
        if (kv0 + BLOCK_N > mask_from) {
            const unsigned key0 = kv0 + 2 * (lane & 3);
#pragma unroll
            for (int m = 0; m < M_REPS; ++m) {
#pragma unroll
                for (int n = 0; n < N_TILES; ++n) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        if (key0 + n * 8 + (e & 1) >= limit[m][e >> 1]) s[m][n][e] = NEG_INF;
                    }
                }
            }
        }

        // Online softmax: new row max (over the quad of lanes sharing a row), rescale what was
        // accumulated, exponentiate the tile. row_sum stays a per-lane partial sum until the end.
        // Maxima and sums run in two independent chains to halve their latency. Once the row
        // maxima settle (after the first few tiles, typically) every correction is exactly 1 and
        // the warp skips rescaling its accumulators.
        float correction[M_REPS][2];
        bool rescale = false;
#pragma unroll
        for (int m = 0; m < M_REPS; ++m) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float max0 = row_max[m][h];
                float max1 = NEG_INF;
#pragma unroll
                for (int n = 0; n < N_TILES; ++n) {
                    max0 = fmaxf(max0, s[m][n][2 * h]);
                    max1 = fmaxf(max1, s[m][n][2 * h + 1]);
                }
                float tile_max = fmaxf(max0, max1);
                tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
                tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
                // A row that has seen only masked keys keeps max -inf; 0 then stands in as the
                // reference so that exp2(-inf - reference) is 0 rather than NaN.
                const float reference = tile_max == NEG_INF ? 0.0f : tile_max * scale_log2;
                correction[m][h] = exp2_approx(row_max[m][h] * scale_log2 - reference);
                rescale |= correction[m][h] != 1.0f;
                row_max[m][h] = tile_max;
                float sum0 = 0.0f;
                float sum1 = 0.0f;
#pragma unroll
                for (int n = 0; n < N_TILES; ++n) {
                    const float w0 = exp2_approx(fmaf(s[m][n][2 * h], scale_log2, -reference));
                    const float w1 = exp2_approx(fmaf(s[m][n][2 * h + 1], scale_log2, -reference));
                    s[m][n][2 * h] = w0;
                    s[m][n][2 * h + 1] = w1;
                    sum0 += w0;
                    sum1 += w1;
                }
                row_sum[m][h] = row_sum[m][h] * correction[m][h] + (sum0 + sum1);
            }
        }
        if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
            for (int m = 0; m < M_REPS; ++m) {
#pragma unroll
                for (int d = 0; d < D_TILES; ++d) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[m][d][e] *= correction[m][e >> 1];
                }
            }
        }

        // O += P V: the score accumulators of two n8 tiles are the A fragment of one k16 step.
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
            unsigned a[M_REPS][4];
#pragma unroll
            for (int m = 0; m < M_REPS; ++m) {
                a[m][0] = pack2<T>(s[m][2 * kk][0], s[m][2 * kk][1]);
                a[m][1] = pack2<T>(s[m][2 * kk][2], s[m][2 * kk][3]);
                a[m][2] = pack2<T>(s[m][2 * kk + 1][0], s[m][2 * kk + 1][1]);
                a[m][3] = pack2<T>(s[m][2 * kk + 1][2], s[m][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dd = 0; dd < HEAD_DIM / 16; ++dd) {
                unsigned b[4];
                ldmatrix_x4_trans(b, v_tile + v_lane + kk * 16 * ROW_BYTES + dd * 32);
#pragma unroll
                for (int m = 0; m < M_REPS; ++m) {
                    mma_16816<T>(acc[m][2 * dd], a[m], b[0], b[1]);
                    mma_16816<T>(acc[m][2 * dd + 1], a[m], b[2], b[3]);
                }
            }
        }
    };

    if constexpr (SCHEDULE != PIPELINED) {
        // K and V of tile j travel in one commit group, issued one tile ahead.
        load_tile(0, true, k_stage(0), true, v_stage(0));
        cp_async_commit();
        float s[M_REPS][N_TILES][4];
        for (unsigned j = 0; j < num_kv_tiles; ++j) {
            // Tile j (and, the first time, Q) has landed for every thread, and every thread is
            // done with tile j - 1, whose stages the copies of tile j + 1 overwrite.
            cp_async_wait<0>();
            __syncthreads();
            const bool more = j + 1 < num_kv_tiles;
            if constexpr (SCHEDULE == LOADS_FIRST) {
                if (more) load_tile(j + 1, true, k_stage(j + 1), true, v_stage(j + 1));
                compute_scores(s, k_stage(j));
            } else {
                // The block-table reads of tile j + 1 go out first and the copies only after the
                // score MMAs are issued, so no warp waits on the table before its MMAs start.
                unsigned ids[ROWS_PER_THREAD];
                if (more) gather.fetch_ids(j + 1, ids);
                compute_scores(s, k_stage(j));
                if (more) gather.issue(j + 1, ids, true, k_stage(j + 1), true, v_stage(j + 1));
            }
            cp_async_commit();
            accumulate(s, j, v_stage(j));
        }
    } else {
        // The scores of tile j + 1 are issued to the tensor cores before the softmax of tile j,
        // so the exponentials (special-function unit) run while the MMAs do. K runs one tile
        // ahead of V: iteration j needs K of tile j + 1 and V of tile j, and loads K of tile
        // j + 2 and V of tile j + 1 into the stages tiles j and j - 1 used.
        load_tile(0, true, k_stage(0), false, 0);
        cp_async_commit();
        if (num_kv_tiles > 1) load_tile(1, true, k_stage(1), false, 0);
        load_tile(0, false, 0, true, v_stage(0));
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        float s_even[M_REPS][N_TILES][4];
        float s_odd[M_REPS][N_TILES][4];
        compute_scores(s_even, k_stage(0));
        auto step = [&](float (&current)[M_REPS][N_TILES][4], float (&next)[M_REPS][N_TILES][4], unsigned j) {
            cp_async_wait<0>();
            __syncthreads();
            if (j + 2 < num_kv_tiles) load_tile(j + 2, true, k_stage(j + 2), false, 0);
            if (j + 1 < num_kv_tiles) load_tile(j + 1, false, 0, true, v_stage(j + 1));
            cp_async_commit();
            if (j + 1 < num_kv_tiles) compute_scores(next, k_stage(j + 1));
            accumulate(current, j, v_stage(j));
        };
        for (unsigned j = 0; j < num_kv_tiles; j += 2) {
            step(s_even, s_odd, j);
            if (j + 1 < num_kv_tiles) step(s_odd, s_even, j + 1);
        }
    }

    // A block id outside the pages anywhere in the tile poisons the whole block's rows.
    const bool poisoned = __syncthreads_or(gather.broken) != 0;

    // Normalise and stage the warp's rows in its own rows of the Q tile (only this warp read them),
    // then write them out as 16-byte stores.
#pragma unroll
    for (int m = 0; m < M_REPS; ++m) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float total = row_sum[m][h];
            total += __shfl_xor_sync(0xffffffffu, total, 1);
            total += __shfl_xor_sync(0xffffffffu, total, 2);
            const float inverse = poisoned ? QUIET_NAN : (total > 0.0f ? 1.0f / total : 0.0f);
            const int r = warp * WARP_ROWS + m * 16 + (lane >> 2) + 8 * h;
            unsigned* dst = reinterpret_cast<unsigned*>(q_tile + r * STRIDE + 2 * (lane & 3));
#pragma unroll
            for (int d = 0; d < D_TILES; ++d) {
                dst[d * 4] = pack2<T>(acc[m][d][2 * h] * inverse, acc[m][d][2 * h + 1] * inverse);
            }
        }
    }
    __syncwarp();
    constexpr int OUT_COPIES = WARP_ROWS * CHUNKS / 32;
    static_assert((WARP_ROWS * CHUNKS) % 32 == 0, "a warp's rows split evenly over its lanes");
#pragma unroll
    for (int c = 0; c < OUT_COPIES; ++c) {
        const int i = lane + c * 32;
        const int r = warp * WARP_ROWS + i / CHUNKS;
        const int chunk = i % CHUNKS;
        const unsigned row = row0 + r;
        if (row < rows) {
            const unsigned token = p.group.div(row);
            const unsigned head = kv_head * group + (row - token * group);
            const uint4 value = *reinterpret_cast<const uint4*>(q_tile + r * STRIDE + chunk * 8);
            *reinterpret_cast<uint4*>(out + (q_begin + token) * q_token_stride + head * HEAD_DIM + chunk * 8) = value;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The sm_90a kernel: warpgroup MMAs (wgmma) with operands from shared memory
// ---------------------------------------------------------------------------------------------
//
// The same work split, gather and online softmax as above, with the products on wgmma (PTX ISA,
// "Asynchronous warpgroup level matrix multiply-accumulate"): a warpgroup of 4 warps owns 64 rows
// and multiplies 64 x N x 16 per instruction, about twice the rate mma.sync reaches on Hopper.
// S = Q K^T takes Q and K straight from shared memory through matrix descriptors; O += P V takes P
// from registers (the score accumulators rounded to 16 bits, in the same fragment layout as
// mma.sync's A operand) and V from shared memory read transposed. Q, K and V tiles are stored in
// the 128-byte swizzled layout (swizzled_offset) the descriptors describe.
//
// Each warpgroup issues a tile's score product, waits for it, runs the softmax, then issues and
// waits for the value product. The tensor cores are kept busy across warpgroups instead: with
// 64-key tiles a block of two warpgroups needs 97 KB of shared memory and (capped) 128 registers
// a thread, so two blocks share an SM and one warpgroup's softmax runs under the others' MMAs.
// Pipelining inside a warpgroup (the next tile's scores issued before this tile's softmax, as
// FlashAttention-3 does) needs a second score tile in registers, which left one block per SM; it
// measured 0.67x of this schedule on an H100 (B4 H32 S4096 D128 causal) and was dropped.

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// A shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address, leading
// and stride byte offsets (all in 16-byte units), 128-byte swizzle (layout type 1 in bits 62-63).
// K-major tiles (Q, K) leave the leading offset unused; the stride offset is the 1024 bytes between
// 8-row groups. The transposed V tile uses the leading offset for the step between its 64-column
// blocks.
__device__ __forceinline__ unsigned long long smem_descriptor(unsigned address, unsigned leading, unsigned stride) {
    return static_cast<unsigned long long>((address & 0x3ffffu) >> 4) |
           (static_cast<unsigned long long>((leading >> 4) & 0x3fffu) << 16) |
           (static_cast<unsigned long long>((stride >> 4) & 0x3fffu) << 32) | (1ull << 62);
}

// Orders this warpgroup's register writes before the wgmma that follow read them.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// Waits until at most N of this warpgroup's wgmma groups are still running.
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Tells the compiler a register changes here, so that reads of a wgmma's accumulators are not
// moved above the wait for it, and registers it reads are not reused before the wait.
__device__ __forceinline__ void operand_fence(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void operand_fence(unsigned& r) { asm volatile("" : "+r"(r)::"memory"); }

// Writes shared memory filled through the generic proxy (cp.async) visible to the async proxy
// that wgmma reads it through; each writing thread runs it before the barrier.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

#define PAGODA_F4(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define PAGODA_F16(d, i) PAGODA_F4(d, i), PAGODA_F4(d, i + 4), PAGODA_F4(d, i + 8), PAGODA_F4(d, i + 12)
#define PAGODA_F32(d, i) PAGODA_F16(d, i), PAGODA_F16(d, i + 16)
#define PAGODA_F64(d) PAGODA_F32(d, 0), PAGODA_F32(d, 32)

// m64 x N x k16 wgmma with f32 accumulators `d` (N / 2 per thread): `ss` with A and B from
// descriptors (both K-major; `accumulate` = 0 overwrites d), `rs` with A from registers (the
// mma.sync A fragment of the thread's warp's 16 rows) and B from a descriptor read transposed
// (an N-major tile), always accumulating.
template <typename T, int N> struct Wgmma;

// One specialisation per (T, N); PTX_TYPE is T's name in the instruction ("f16" or "bf16").
#define PAGODA_WGMMA_N64(T, PTX_TYPE)                                                                        \
    template <> struct Wgmma<T, 64> {                                                                        \
        static __device__ __forceinline__ void ss(float (&d)[32], unsigned long long a, unsigned long long b, \
                                                  int accumulate) {                                          \
            asm volatile(                                                                                    \
                "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                 \
                "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX_TYPE "." PTX_TYPE " "                      \
                "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
                "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "                              \
                "%32, %33, p, 1, 1, 0, 0;\n}\n"                                                               \
                : PAGODA_F32(d, 0)                                                                           \
                : "l"(a), "l"(b), "r"(accumulate));                                                          \
        }                                                                                                    \
        static __device__ __forceinline__ void rs(float (&d)[32], const unsigned (&a)[4], unsigned long long b) { \
            asm volatile(                                                                                    \
                "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                 \
                "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX_TYPE "." PTX_TYPE " "                      \
                "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
                "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "                              \
                "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                                 \
                : PAGODA_F32(d, 0)                                                                           \
                : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(1));                               \
        }                                                                                                    \
    };

#define PAGODA_WGMMA_N128(T, PTX_TYPE)                                                                       \
    template <> struct Wgmma<T, 128> {                                                                       \
        static __device__ __forceinline__ void ss(float (&d)[64], unsigned long long a, unsigned long long b, \
                                                  int accumulate) {                                          \
            asm volatile(                                                                                    \
                "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                 \
                "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX_TYPE "." PTX_TYPE " "                     \
                "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
                "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
                "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
                "%56, %57, %58, %59, %60, %61, %62, %63}, "                                                  \
                "%64, %65, p, 1, 1, 0, 0;\n}\n"                                                               \
                : PAGODA_F64(d)                                                                              \
                : "l"(a), "l"(b), "r"(accumulate));                                                          \
        }                                                                                                    \
        static __device__ __forceinline__ void rs(float (&d)[64], const unsigned (&a)[4], unsigned long long b) { \
            asm volatile(                                                                                    \
                "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                 \
                "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX_TYPE "." PTX_TYPE " "                     \
                "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
                "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
                "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
                "%56, %57, %58, %59, %60, %61, %62, %63}, "                                                  \
                "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                                 \
                : PAGODA_F64(d)                                                                              \
                : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(1));                               \
        }                                                                                                    \
    };

PAGODA_WGMMA_N64(half_t, "f16")
PAGODA_WGMMA_N128(half_t, "f16")
PAGODA_WGMMA_N64(bf16_t, "bf16")
PAGODA_WGMMA_N128(bf16_t, "bf16")

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// WARPGROUPS x 64 query rows per block (128 threads each), BLOCK_N keys per tile (64 or 128),
// HEAD_DIM a multiple of 64 (64 or 128: the N of the value product). Dynamic shared memory:
// (64 WARPGROUPS + 4 BLOCK_N) HEAD_DIM 2 bytes + 1024 for the alignment the swizzle needs.
template <typename T, int HEAD_DIM, int WARPGROUPS, int BLOCK_N>
__device__ __forceinline__ void flash_attention_wgmma(const T* __restrict__ q, const T* __restrict__ k_pages,
                                                      const T* __restrict__ v_pages, T* __restrict__ out,
                                                      const Problem& p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    static_assert(HEAD_DIM % 64 == 0 && (BLOCK_N == 64 || BLOCK_N == 128), "wgmma tile shapes");
    constexpr int THREADS = WARPGROUPS * 128;
    constexpr int BLOCK_M = WARPGROUPS * 64;
    constexpr int CHUNKS = HEAD_DIM / 8;
    static_assert((BLOCK_M * CHUNKS) % THREADS == 0, "Q tiles split evenly over the threads");
    constexpr int Q_COPIES = BLOCK_M * CHUNKS / THREADS;
    // Per thread: the scores of its 2 rows x BLOCK_N / 4 keys, its outputs of 2 rows x HEAD_DIM / 4.
    constexpr int S_REGS = BLOCK_N / 2;
    constexpr int O_REGS = HEAD_DIM / 2;
    constexpr int P_STEPS = BLOCK_N / 16;
    constexpr unsigned Q_BYTES = BLOCK_M * HEAD_DIM * 2;
    constexpr unsigned KV_BYTES = BLOCK_N * HEAD_DIM * 2;

    extern __shared__ __align__(16) unsigned char shared[];
    const unsigned raw_base = shared_address(shared);
    const unsigned q_base = (raw_base + 1023u) & ~1023u;
    unsigned char* q_tile = shared + (q_base - raw_base);
    const unsigned k_base = q_base + Q_BYTES;
    const unsigned v_base = k_base + 2 * KV_BYTES;
    auto k_stage = [&](unsigned j) { return k_base + (j & 1) * KV_BYTES; };
    auto v_stage = [&](unsigned j) { return v_base + (j & 1) * KV_BYTES; };

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int warpgroup = warp >> 2;

    WorkTile w;
    if (!locate_work<BLOCK_M, BLOCK_N>(p, w)) return;
    const unsigned group = p.group.divisor;
    const unsigned long long q_token_stride = static_cast<unsigned long long>(p.num_heads) * HEAD_DIM;

    // Q tile, swizzled: row r is token (row0 + r) / G, head kv_head * G + (row0 + r) % G; rows
    // past the sequence are zero-filled.
#pragma unroll
    for (int c = 0; c < Q_COPIES; ++c) {
        const int i = tid + c * THREADS;
        const int r = i / CHUNKS;
        const int chunk = i % CHUNKS;
        const unsigned row = w.row0 + r;
        const bool valid = row < w.rows;
        const unsigned token = valid ? p.group.div(row) : 0;
        const unsigned head = w.kv_head * group + (valid ? row - token * group : 0);
        const T* src = q + (w.q_begin + token) * q_token_stride + head * HEAD_DIM + chunk * 8;
        cp_async_16(q_base + swizzled_offset<BLOCK_M>(r, chunk), src, valid ? 16u : 0u);
    }
    KvGather<T, HEAD_DIM, BLOCK_N, THREADS, true> gather(p, w, k_pages, v_pages, tid);

    // This thread's rows: block row warp * 16 + lane / 4 + 8 h sees keys k < limit[h].
    unsigned limit[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const unsigned row = w.row0 + warp * 16 + (lane >> 2) + 8 * h;
        limit[h] = row >= w.rows ? 0 : (p.causal ? w.first_position + p.group.div(row) + 1 : w.context);
    }

    float o[O_REGS];
#pragma unroll
    for (int i = 0; i < O_REGS; ++i) o[i] = 0.0f;
    float s[S_REGS];
#pragma unroll
    for (int i = 0; i < S_REGS; ++i) s[i] = 0.0f;
    unsigned pa[P_STEPS][4];
    float row_max[2] = {NEG_INF, NEG_INF};
    float row_sum[2] = {0.0f, 0.0f};
    const float scale_log2 = p.scale_log2;

    // S = Q K^T for the warpgroup's 64 rows, issued as one wgmma group (not waited for). Step kk
    // reads 16 columns: 64-column block kk / 4 of the tiles, 32 bytes further per step inside it.
    const unsigned q_rows = q_base + warpgroup * 64 * 128;
    auto issue_scores = [&](unsigned k_tile) {
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
            const unsigned column = (kk & 3) * 32u;
            const unsigned long long a =
                smem_descriptor(q_rows + (kk >> 2) * (BLOCK_M * 128u) + column, 16, 1024);
            const unsigned long long b = smem_descriptor(k_tile + (kk >> 2) * (BLOCK_N * 128u) + column, 16, 1024);
            Wgmma<T, BLOCK_N>::ss(s, a, b, kk > 0 ? 1 : 0);
        }
        wgmma_commit();
    };
    // O += P V with P from `pa`, issued as one wgmma group. Step kk reads 16 keys (two 8-row
    // groups, 2048 bytes); the leading offset steps between V's 64-column blocks.
    auto issue_values = [&](unsigned v_tile) {
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < P_STEPS; ++kk) {
            const unsigned long long b = smem_descriptor(v_tile + kk * 2048u, BLOCK_N * 128u, 1024);
            Wgmma<T, HEAD_DIM>::rs(o, pa[kk], b);
        }
        wgmma_commit();
    };
    auto scores_landed = [&]() {
#pragma unroll
        for (int i = 0; i < S_REGS; ++i) operand_fence(s[i]);
    };
    auto values_landed = [&]() {
#pragma unroll
        for (int i = 0; i < O_REGS; ++i) operand_fence(o[i]);
#pragma unroll
        for (int kk = 0; kk < P_STEPS; ++kk) {
#pragma unroll
            for (int e = 0; e < 4; ++e) operand_fence(pa[kk][e]);
        }
    };

    // Masks tile j's scores and folds them into the running softmax, leaving the exponentiated
    // scores in s and each row's rescale factor in `correction`; returns whether the warp must
    // rescale its outputs. s[4 n + e] is row lane / 4 + 8 (e / 2), key 8 n + 2 (lane % 4) + e % 2.
    auto softmax = [&](unsigned j, float (&correction)[2]) {
        const unsigned kv0 = j * BLOCK_N;
        if (kv0 + BLOCK_N > w.mask_from) {
            const unsigned key0 = kv0 + 2 * (lane & 3);
#pragma unroll
            for (int n = 0; n < BLOCK_N / 8; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    if (key0 + n * 8 + (e & 1) >= limit[e >> 1]) s[4 * n + e] = NEG_INF;
                }
            }
        }
        bool rescale = false;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float max0 = row_max[h];
            float max1 = NEG_INF;
#pragma unroll
            for (int n = 0; n < BLOCK_N / 8; ++n) {
                max0 = fmaxf(max0, s[4 * n + 2 * h]);
                max1 = fmaxf(max1, s[4 * n + 2 * h + 1]);
            }
            float tile_max = fmaxf(max0, max1);
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
            // A row that has seen only masked keys keeps max -inf; 0 then stands in as the
            // reference so that exp2(-inf - reference) is 0 rather than NaN.
            const float reference = tile_max == NEG_INF ? 0.0f : tile_max * scale_log2;
            correction[h] = exp2_approx(row_max[h] * scale_log2 - reference);
            rescale |= correction[h] != 1.0f;
            row_max[h] = tile_max;
            float sum0 = 0.0f;
            float sum1 = 0.0f;
#pragma unroll
            for (int n = 0; n < BLOCK_N / 8; ++n) {
                const float w0 = exp2_approx(fmaf(s[4 * n + 2 * h], scale_log2, -reference));
                const float w1 = exp2_approx(fmaf(s[4 * n + 2 * h + 1], scale_log2, -reference));
                s[4 * n + 2 * h] = w0;
                s[4 * n + 2 * h + 1] = w1;
                sum0 += w0;
                sum1 += w1;
            }
            row_sum[h] = row_sum[h] * correction[h] + (sum0 + sum1);
        }
        return __any_sync(0xffffffffu, rescale);
    };
    auto rescale_outputs = [&](const float (&correction)[2]) {
#pragma unroll
        for (int i = 0; i < O_REGS; ++i) o[i] *= correction[(i >> 1) & 1];
    };
    // The exponentiated scores of two n8 tiles are the A fragment of one k16 step.
    auto pack_probabilities = [&]() {
#pragma unroll
        for (int kk = 0; kk < P_STEPS; ++kk) {
#pragma unroll
            for (int e = 0; e < 4; ++e) pa[kk][e] = pack2<T>(s[8 * kk + 2 * e], s[8 * kk + 2 * e + 1]);
        }
    };

    gather.load(0, true, k_stage(0), true, v_stage(0));
    cp_async_commit();
    for (unsigned j = 0; j < w.num_kv_tiles; ++j) {
        // Tile j (and, the first time, Q) has landed for every thread, and every warpgroup is
        // done with tile j - 1, whose stages the copies of tile j + 1 overwrite.
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        if (j + 1 < w.num_kv_tiles) gather.load(j + 1, true, k_stage(j + 1), true, v_stage(j + 1));
        cp_async_commit();
        issue_scores(k_stage(j));
        wgmma_wait<0>();
        scores_landed();
        float correction[2];
        if (softmax(j, correction)) rescale_outputs(correction);
        pack_probabilities();
        issue_values(v_stage(j));
        wgmma_wait<0>();
        values_landed();
    }
    // A block id outside the pages anywhere in the tile poisons the whole block's rows. Every
    // wgmma has completed, so the Q tile is free: each warp stages its 16 rows there (swizzled as
    // Q was) and writes them out as 16-byte stores.
    const bool poisoned = __syncthreads_or(gather.broken) != 0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float total = row_sum[h];
        total += __shfl_xor_sync(0xffffffffu, total, 1);
        total += __shfl_xor_sync(0xffffffffu, total, 2);
        const float inverse = poisoned ? QUIET_NAN : (total > 0.0f ? 1.0f / total : 0.0f);
        const unsigned r = warp * 16 + (lane >> 2) + 8 * h;
#pragma unroll
        for (int n = 0; n < HEAD_DIM / 8; ++n) {
            unsigned* dst = reinterpret_cast<unsigned*>(q_tile + swizzled_offset<BLOCK_M>(r, n) + 4 * (lane & 3));
            *dst = pack2<T>(o[4 * n + 2 * h] * inverse, o[4 * n + 2 * h + 1] * inverse);
        }
    }
    __syncwarp();
    constexpr int OUT_COPIES = 16 * CHUNKS / 32;
#pragma unroll
    for (int c = 0; c < OUT_COPIES; ++c) {
        const int i = lane + c * 32;
        const unsigned r = warp * 16 + i / CHUNKS;
        const int chunk = i % CHUNKS;
        const unsigned row = w.row0 + r;
        if (row < w.rows) {
            const unsigned token = p.group.div(row);
            const unsigned head = w.kv_head * group + (row - token * group);
            const uint4 value = *reinterpret_cast<const uint4*>(q_tile + swizzled_offset<BLOCK_M>(r, chunk));
            *reinterpret_cast<uint4*>(out + (w.q_begin + token) * q_token_stride + head * HEAD_DIM + chunk * 8) =
                value;
        }
    }
#else
    // Launched only on sm_90a builds (the launcher checks); anywhere else this is a bug.
    __trap();
#endif
}

// The kernel a SCHEDULE names.
template <typename T, int HEAD_DIM, int M_REPS, int WARPS, int BLOCK_N, int SCHEDULE>
__device__ __forceinline__ void flash_attention_kernel(const T* __restrict__ q, const T* __restrict__ k_pages,
                                                       const T* __restrict__ v_pages, T* __restrict__ out,
                                                       const Problem& p) {
    if constexpr (SCHEDULE == WGMMA) {
        static_assert(M_REPS == 1 && WARPS % 4 == 0, "wgmma blocks are whole warpgroups of 16-row warps");
        flash_attention_wgmma<T, HEAD_DIM, WARPS / 4, BLOCK_N>(q, k_pages, v_pages, out, p);
    } else {
        flash_attention<T, HEAD_DIM, M_REPS, WARPS, BLOCK_N, SCHEDULE>(q, k_pages, v_pages, out, p);
    }
}

}  // namespace

// q, out [num_tokens, num_heads, head_dim]; k_pages, v_pages [num_blocks, block_size, num_kv_heads,
// head_dim], all 16-byte aligned; query_start [num_seqs + 1] (cumulative), context_len [num_seqs],
// block_tables [num_seqs, max_blocks]; (group, group_mul, group_shift) for group = num_heads /
// num_kv_heads and (block_size, block_size_mul, block_size_shift) as FastDivisor describes. A 1-D
// grid of total_tiles * num_kv_heads blocks of WARPS * 32 threads, total_tiles = floor(num_tokens *
// G / BLOCK_M) + num_seqs; dynamic shared memory (BLOCK_M + 4 * BLOCK_N) * (head_dim + 8) * 2
// bytes. scale_log2 = scale * log2(e) > 0.
#define PAGODA_FLASH_ATTENTION(NAME, T, D, M_REPS, WARPS, BLOCK_N, SCHEDULE, MIN_BLOCKS)                           \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)                                           \
        NAME(const T* __restrict__ q, const T* __restrict__ k_pages, const T* __restrict__ v_pages,                \
             T* __restrict__ out, const unsigned* __restrict__ query_start, const unsigned* __restrict__ context_len, \
             const unsigned* __restrict__ block_tables, unsigned num_seqs, unsigned max_blocks, unsigned num_heads, \
             unsigned num_kv_heads, unsigned group, unsigned group_mul, unsigned group_shift, unsigned block_size, \
             unsigned block_size_mul, unsigned block_size_shift, unsigned num_blocks, unsigned total_tiles,        \
             float scale_log2, unsigned causal) {                                                                  \
        const Problem problem{query_start,                                                                         \
                              context_len,                                                                         \
                              block_tables,                                                                        \
                              num_seqs,                                                                            \
                              max_blocks,                                                                          \
                              num_heads,                                                                           \
                              num_kv_heads,                                                                        \
                              FastDivisor{group, group_mul, group_shift},                                          \
                              FastDivisor{block_size, block_size_mul, block_size_shift},                           \
                              num_blocks,                                                                          \
                              total_tiles,                                                                         \
                              scale_log2,                                                                          \
                              causal != 0};                                                                        \
        flash_attention_kernel<T, D, M_REPS, WARPS, BLOCK_N, SCHEDULE>(q, k_pages, v_pages, out, problem);          \
    }

// Every tile shape the launcher (crates/pagoda-kernels/src/cuda/flash_attention.rs, TILE_SHAPES)
// knows, for both dtypes: flash_attention_d<D>_m<M_REPS>w<WARPS>n<BLOCK_N><schedule suffix>_<dtype>.
// MIN_BLOCKS, the blocks an SM should hold, caps the registers per thread.
#define PAGODA_FLASH_ATTENTION_SHAPE(D, M_REPS, WARPS, BLOCK_N, SCHEDULE, SUFFIX, MIN_BLOCKS)                     \
    PAGODA_FLASH_ATTENTION(flash_attention_d##D##_m##M_REPS##w##WARPS##n##BLOCK_N##SUFFIX##_f16, half_t, D, M_REPS, \
                           WARPS, BLOCK_N, SCHEDULE, MIN_BLOCKS)                                                   \
    PAGODA_FLASH_ATTENTION(flash_attention_d##D##_m##M_REPS##w##WARPS##n##BLOCK_N##SUFFIX##_bf16, bf16_t, D,       \
                           M_REPS, WARPS, BLOCK_N, SCHEDULE, MIN_BLOCKS)

PAGODA_FLASH_ATTENTION_SHAPE(64, 2, 4, 64, LOADS_FIRST, , 2)
PAGODA_FLASH_ATTENTION_SHAPE(80, 2, 4, 64, LOADS_FIRST, , 2)
PAGODA_FLASH_ATTENTION_SHAPE(96, 2, 4, 64, LOADS_FIRST, , 2)
PAGODA_FLASH_ATTENTION_SHAPE(128, 2, 4, 64, LOADS_FIRST, , 2)
PAGODA_FLASH_ATTENTION_SHAPE(256, 1, 4, 32, LOADS_FIRST, , 2)
PAGODA_FLASH_ATTENTION_SHAPE(64, 2, 4, 64, LOADS_LATE, l, 2)
PAGODA_FLASH_ATTENTION_SHAPE(80, 2, 4, 64, LOADS_LATE, l, 2)
PAGODA_FLASH_ATTENTION_SHAPE(96, 2, 4, 64, LOADS_LATE, l, 2)
PAGODA_FLASH_ATTENTION_SHAPE(128, 2, 4, 64, LOADS_LATE, l, 2)
PAGODA_FLASH_ATTENTION_SHAPE(256, 1, 4, 32, LOADS_LATE, l, 2)
PAGODA_FLASH_ATTENTION_SHAPE(96, 2, 4, 32, PIPELINED, p, 2)
PAGODA_FLASH_ATTENTION_SHAPE(256, 1, 4, 32, PIPELINED, p, 2)
PAGODA_FLASH_ATTENTION_SHAPE(128, 1, 8, 128, WGMMA, g, 1)
PAGODA_FLASH_ATTENTION_SHAPE(128, 1, 8, 64, WGMMA, g, 2)
PAGODA_FLASH_ATTENTION_SHAPE(128, 1, 4, 64, WGMMA, g, 2)
PAGODA_FLASH_ATTENTION_SHAPE(64, 1, 8, 64, WGMMA, g, 2)
