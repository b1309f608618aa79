// NF4 weights (crates/pagoda-kernels/src/cpu/nf4.rs is the oracle and documents the format, which
// is bitsandbytes'): decoding to a dense tensor, and products x · wᵀ that read the packed weights
// once and decode them in registers.
//
// Decoding (`nf4_dequantize_*`) computes CODE[q] * absmax with one f32 multiplication (and a
// nested scale as code8[q8] * absmax2 + offset, two separately rounded operations: __fmul_rn and
// __fadd_rn keep the compiler from contracting them into an FMA), then rounds once to the output
// type: the same bits as bitsandbytes' dequantize_4bit.
//
// The product is `nf4_gemv_*` for one row of x (at the end of the file) and `nf4_linear_*`
// for decode batches and short prefill chunks, m <= 64 rows of x (f16 or
// bf16), k a multiple of 64, blocks of at least 64 values. It runs on tensor cores (mma.sync
// m16n8k16, f32 accumulators) with the weights as the A operand, tiles of 16 weight rows, and
// x as B, 8 rows of x per n-tile:
// - A fragment registers hold two consecutive k each, exactly one packed byte; a 256-entry table
//   in shared memory maps a byte to its two code values (unscaled, as f16x2 or bf16x2), so one
//   shared load decodes two weights. The table is replicated 32 times, lane l reading copy l,
//   which puts every lane's lookup in its own bank whatever the bytes are.
// - Which k an MMA slot stands for is free as long as A and B agree, so each lane takes its
//   weights as 8 contiguous bytes of a row: lane (g, q) = (lane / 4, lane % 4) reads bytes
//   8q..8q+8 of the 32-byte (64-value) chunk of rows g and g + 8. All 16 k of an MMA then fall
//   in one 64-value chunk, one block, so the four MMAs of a chunk accumulate unscaled products
//   and are scaled once per row and chunk in f32 (C += absmax * C_chunk), not once per weight.
// - The lane's B fragment is x[row g of the n-tile][16q + 4t .. + 4] for sub-step t, 32
//   contiguous bytes of x per chunk, read through L1 (x is small and shared by every block).
// - The grid has at most NF4_BLOCKS_PER_SM blocks per SM, each looping over row tiles (tile,
//   tile + gridDim.x, ...), so the byte table is built once per block. The warps of a block split
//   k (chunks w, w + NF4_WARPS, ...); each warp walks its (tile, step of chunks) items with the
//   loads of the next item in flight while it computes the current one (streaming,
//   L1::no_allocate loads), so the next tile's weights arrive while the block finishes the
//   current tile. Partial sums meet in shared memory, where the epilogue adds the bias and applies
//   the activation (GELU, or SwiGLU over a [gate; up] matrix: a tile then holds 8 gate rows and
//   their 8 up rows, so rows g and g + 8 of a lane are a gate and its up) and the addend, as in
//   gemv.cu.
// Precision: the code values are rounded to the activation type (2^-11 relative for f16, 2^-8
// for bf16) before the exact tensor-core products; accumulation and scaling are f32.

#include "common.cuh"
#include "activation.cuh"
#include "mma.cuh"

namespace {

// The NF4 code (QLoRA, appendix E), as bitsandbytes decodes it.
__constant__ float NF4_CODE[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// Where a tensor's block scales come from: `absmax` holds f32 scales, or with `nested` one byte
// per block that indexes `code2`, scaled by `absmax2` and shifted by `offset2` of its group of
// 2^nested_shift blocks.
struct Scales {
    const void* absmax;
    const float* code2;
    const float* absmax2;
    const float* offset2;
    int nested;
    unsigned nested_shift;
};

__device__ __forceinline__ float block_scale(const Scales& s, unsigned long long block) {
    if (!s.nested) return __ldg(static_cast<const float*>(s.absmax) + block);
    const unsigned char q = __ldg(static_cast<const unsigned char*>(s.absmax) + block);
    const unsigned long long group = block >> s.nested_shift;
    return __fadd_rn(__fmul_rn(__ldg(s.code2 + q), __ldg(s.absmax2 + group)), __ldg(s.offset2 + group));
}

// A block scale in two steps, so that a batch of loads can be issued before anything waits
// for one: `load_scale` fetches the f32 absmax's bits, or the 8-bit code of a nested scale;
// `decode_scale` finishes a nested one with the code (from `code2`, a shared-memory copy of
// the 256 entries) and its group's scale and offset (small arrays, read through the cache).
__device__ __forceinline__ unsigned load_scale(const Scales& s, unsigned long long block) {
    if (!s.nested) return __float_as_uint(__ldg(static_cast<const float*>(s.absmax) + block));
    return __ldg(static_cast<const unsigned char*>(s.absmax) + block);
}

__device__ __forceinline__ float decode_scale(const Scales& s, unsigned raw, unsigned long long block,
                                              const float* code2) {
    if (!s.nested) return __uint_as_float(raw);
    const unsigned long long group = block >> s.nested_shift;
    return __fadd_rn(__fmul_rn(code2[raw], __ldg(s.absmax2 + group)), __ldg(s.offset2 + group));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

// Elements decoded per thread and step.
constexpr int DEQUANT_PER_THREAD = 8;

template <typename T>
__device__ __forceinline__ void dequantize_kernel(const unsigned char* __restrict__ packed, Scales s,
                                                  unsigned block_shift, unsigned long long start,
                                                  unsigned long long count, T* __restrict__ out) {
    __shared__ float code[16];
    if (threadIdx.x < 16) code[threadIdx.x] = NF4_CODE[threadIdx.x];
    __syncthreads();
    const unsigned long long stride = static_cast<unsigned long long>(gridDim.x) * blockDim.x * DEQUANT_PER_THREAD;
    for (unsigned long long e0 = (static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x) *
                                 DEQUANT_PER_THREAD;
         e0 < count; e0 += stride) {
        float v[DEQUANT_PER_THREAD];
#pragma unroll
        for (int j = 0; j < DEQUANT_PER_THREAD; ++j) {
            v[j] = 0.0f;
            if (e0 + j < count) {
                const unsigned long long g = start + e0 + j;
                const unsigned char byte = __ldg(packed + (g >> 1));
                const unsigned nibble = (g & 1) ? (byte & 15u) : (byte >> 4);
                v[j] = __fmul_rn(code[nibble], block_scale(s, g >> block_shift));
            }
        }
        if (e0 + DEQUANT_PER_THREAD <= count && is_aligned16(out + e0)) {
            store_vec<DEQUANT_PER_THREAD>(out + e0, v);
        } else {
#pragma unroll
            for (int j = 0; j < DEQUANT_PER_THREAD; ++j)
                if (e0 + j < count) out[e0 + j] = from_float<T>(v[j]);
        }
    }
}

// out[i] = value of element start + i, for i < count.
#define NF4_DEQUANTIZE_KERNEL(suffix, T)                                                         \
    extern "C" __global__ void nf4_dequantize_##suffix(                                          \
        const unsigned char* __restrict__ packed, const void* absmax, const float* code2,        \
        const float* absmax2, const float* offset2, int nested, unsigned nested_shift,           \
        unsigned block_shift, unsigned long long start, unsigned long long count,               \
        T* __restrict__ out) {                                                                   \
        dequantize_kernel<T>(packed, Scales{absmax, code2, absmax2, offset2, nested, nested_shift}, \
                             block_shift, start, count, out);                                    \
    }
PAGODA_FOR_EACH_FLOAT(NF4_DEQUANTIZE_KERNEL)
#undef NF4_DEQUANTIZE_KERNEL

// ---------------------------------------------------------------------------------------------
// The product
// ---------------------------------------------------------------------------------------------

// Warps per block, and blocks per SM: the registers of the launch bound (128 a thread) and the
// shared memory (38 KB a block) leave room for two.
constexpr int NF4_WARPS = 8;
constexpr int NF4_BLOCKS_PER_SM = 2;
// Weight rows per block (the MMA's M).
constexpr int NF4_ROWS = 16;
// Copies of the byte table, one per lane.
constexpr int TABLE_COPIES = 32;

// bias_kind (0: none) and act (0: none), as in gemv.cu.
constexpr int BIAS_F32 = 1;
constexpr int BIAS_SAME = 2;
constexpr int ACT_GELU = 1;
constexpr int ACT_GELU_TANH = 2;
constexpr int ACT_SILU_GATE = 3;

namespace {

// 8 packed bytes, read once and kept out of L1 (x should stay there).
__device__ __forceinline__ uint2 load_stream8(const unsigned char* p) {
    uint2 v;
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

// The byte table entry of byte BYTE of `word` for the lane whose column is `lane_bytes` (lane * 4):
// a byte offset into the table, row (byte) * 128 plus the lane's column.
template <int BYTE>
__device__ __forceinline__ unsigned table_offset(unsigned word, unsigned lane_bytes) {
    const unsigned shifted = BYTE == 0 ? (word << 7) : (word >> (8 * BYTE - 7));
    return (shifted & 0x7f80u) | lane_bytes;
}

__device__ __forceinline__ unsigned table_entry(const unsigned char* table, unsigned offset) {
    return *reinterpret_cast<const unsigned*>(table + offset);
}

}  // namespace


// Chunks per pipeline step (two steps of registers are live at once).
template <int NT> struct StepChunks {
    static constexpr int N = NT <= 2 ? 4 : 2;
};

template <int NT> struct WeightStep {
    uint2 w[StepChunks<NT>::N][2];
    unsigned raw[StepChunks<NT>::N][2];
};

template <typename T, int NT>
__device__ __forceinline__ void linear_kernel(
    const T* __restrict__ x, const unsigned char* __restrict__ packed, Scales s, unsigned block_shift,
    unsigned row_begin, const void* __restrict__ bias, int bias_kind, const T* __restrict__ addend, int act,
    T* __restrict__ out, unsigned m, unsigned n, unsigned k) {
    constexpr int STEP = StepChunks<NT>::N;
    constexpr int TABLE_BYTES = 256 * TABLE_COPIES * 4;
    __shared__ __align__(16) unsigned char table[TABLE_BYTES];
    __shared__ float code2[256];
    // One n-tile of partial sums at a time: [warp][A row][x row of the tile].
    __shared__ float partial[NF4_WARPS][NF4_ROWS][8];

    const unsigned tid = threadIdx.x;
    const unsigned lane = tid & 31;
    const unsigned warp = tid >> 5;
    const unsigned g = lane >> 2;
    const unsigned q = lane & 3;
    const bool gated = act == ACT_SILU_GATE;
    const unsigned outputs_per_tile = gated ? 8 : NF4_ROWS;
    const unsigned tiles = (n + outputs_per_tile - 1) / outputs_per_tile;
    const unsigned chunks = k / 64;
    // Every warp runs the same number of steps per tile (its chunks past k load nothing), so
    // the block's barriers line up.
    const unsigned steps_per_tile = ((chunks + NF4_WARPS - 1) / NF4_WARPS + STEP - 1) / STEP;
    const unsigned my_tiles = blockIdx.x < tiles ? (tiles - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
    const unsigned items = my_tiles * steps_per_tile;

    // The stored rows of A rows g and g + 8 in tile `tile` (rows past the end re-read the last).
    auto row_starts = [&](unsigned tile, unsigned long long (&start)[2]) {
        unsigned r0, r1;
        if (gated) {
            const unsigned j = min(tile * 8 + g, n - 1);
            r0 = row_begin + j;
            r1 = row_begin + n + j;
        } else {
            r0 = row_begin + min(tile * NF4_ROWS + g, n - 1);
            r1 = row_begin + min(tile * NF4_ROWS + g + 8, n - 1);
        }
        start[0] = static_cast<unsigned long long>(r0) * k;
        start[1] = static_cast<unsigned long long>(r1) * k;
    };
    auto tile_of = [&](unsigned item) { return blockIdx.x + (item / steps_per_tile) * gridDim.x; };
    auto chunk_of = [&](unsigned item, int u) { return warp + ((item % steps_per_tile) * STEP + u) * NF4_WARPS; };

    auto load = [&](unsigned item, WeightStep<NT>& step) {
        unsigned long long start[2];
        row_starts(tile_of(item), start);
#pragma unroll
        for (int u = 0; u < STEP; ++u) {
            const unsigned c = chunk_of(item, u);
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                if (c < chunks) {
                    step.w[u][r] = load_stream8(packed + start[r] / 2 + q * 8 + c * 32);
                    step.raw[u][r] = load_scale(s, (start[r] + c * 64) >> block_shift);
                } else {
                    step.w[u][r] = make_uint2(0u, 0u);
                    step.raw[u][r] = 0u;
                }
            }
        }
    };

    float acc[NT][4];
    const unsigned lane_bytes = lane * 4;
    auto compute = [&](unsigned item, const WeightStep<NT>& step) {
        unsigned long long start[2];
        row_starts(tile_of(item), start);
#pragma unroll
        for (int u = 0; u < STEP; ++u) {
            const unsigned c = chunk_of(item, u);
            if (c >= chunks) break;
            const float scale0 = decode_scale(s, step.raw[u][0], (start[0] + c * 64) >> block_shift, code2);
            const float scale1 = decode_scale(s, step.raw[u][1], (start[1] + c * 64) >> block_shift, code2);
            float part[NT][4];
#pragma unroll
            for (int t = 0; t < NT; ++t)
#pragma unroll
                for (int i = 0; i < 4; ++i) part[t][i] = 0.0f;
#pragma unroll
            for (int sub = 0; sub < 4; ++sub) {
                const unsigned wa = sub < 2 ? step.w[u][0].x : step.w[u][0].y;
                const unsigned wb = sub < 2 ? step.w[u][1].x : step.w[u][1].y;
                unsigned a[4];
                if (sub % 2 == 0) {
                    a[0] = table_entry(table, table_offset<0>(wa, lane_bytes));
                    a[1] = table_entry(table, table_offset<0>(wb, lane_bytes));
                    a[2] = table_entry(table, table_offset<1>(wa, lane_bytes));
                    a[3] = table_entry(table, table_offset<1>(wb, lane_bytes));
                } else {
                    a[0] = table_entry(table, table_offset<2>(wa, lane_bytes));
                    a[1] = table_entry(table, table_offset<2>(wb, lane_bytes));
                    a[2] = table_entry(table, table_offset<3>(wa, lane_bytes));
                    a[3] = table_entry(table, table_offset<3>(wb, lane_bytes));
                }
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    const unsigned row = t * 8 + g;
                    const uint2 b = row < m ? *reinterpret_cast<const uint2*>(x + static_cast<size_t>(row) * k +
                                                                              c * 64 + q * 16 + 4 * sub)
                                            : make_uint2(0u, 0u);
                    mma_16816<T>(part[t], a, b.x, b.y);
                }
            }
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                acc[t][0] = fmaf(scale0, part[t][0], acc[t][0]);
                acc[t][1] = fmaf(scale0, part[t][1], acc[t][1]);
                acc[t][2] = fmaf(scale1, part[t][2], acc[t][2]);
                acc[t][3] = fmaf(scale1, part[t][3], acc[t][3]);
            }
        }
    };

    // Sums the warps' partial products of `tile`, one n-tile at a time, and stores the outputs.
    auto finish = [&](unsigned tile) {
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            __syncthreads();
            partial[warp][g][2 * q] = acc[t][0];
            partial[warp][g][2 * q + 1] = acc[t][1];
            partial[warp][g + 8][2 * q] = acc[t][2];
            partial[warp][g + 8][2 * q + 1] = acc[t][3];
            __syncthreads();
            if (tid < outputs_per_tile * 8) {
                const unsigned r = tid % outputs_per_tile;
                const unsigned i = t * 8 + tid / outputs_per_tile;
                const unsigned j = tile * outputs_per_tile + r;
                if (i < m && j < n) {
                    float sum = 0.0f;
                    for (int v = 0; v < NF4_WARPS; ++v) sum += partial[v][r][i - t * 8];
                    if (bias_kind == BIAS_F32) sum += static_cast<const float*>(bias)[j];
                    else if (bias_kind == BIAS_SAME) sum += to_float(static_cast<const T*>(bias)[j]);
                    if (gated) {
                        float up = 0.0f;
                        for (int v = 0; v < NF4_WARPS; ++v) up += partial[v][r + 8][i - t * 8];
                        if (bias_kind == BIAS_F32) up += static_cast<const float*>(bias)[n + j];
                        else if (bias_kind == BIAS_SAME) up += to_float(static_cast<const T*>(bias)[n + j]);
                        sum = SiluMul()(sum, up);
                    } else if (act == ACT_GELU) {
                        sum = GeluExact()(sum);
                    } else if (act == ACT_GELU_TANH) {
                        sum = GeluTanh()(sum);
                    }
                    const size_t at = static_cast<size_t>(i) * n + j;
                    if (addend != nullptr) sum += to_float(addend[at]);
                    out[at] = from_float<T>(sum);
                }
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[t][i] = 0.0f;
        }
    };

    WeightStep<NT> even, odd;
    if (items > 0) load(0, even);
    // The first step is in flight while the tables are built.
    for (unsigned b = tid; b < 256 * TABLE_COPIES / 4; b += blockDim.x) {
        const unsigned byte = b / (TABLE_COPIES / 4);
        const unsigned pair = pack2<T>(NF4_CODE[byte >> 4], NF4_CODE[byte & 15]);
        reinterpret_cast<uint4*>(table)[b] = make_uint4(pair, pair, pair, pair);
    }
    if (s.nested)
        for (unsigned i = tid; i < 256; i += blockDim.x) code2[i] = __ldg(s.code2 + i);
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[t][i] = 0.0f;
    __syncthreads();

    // Steps alternate between the two buffers; the next one is requested before the current
    // one is used. `items` and `steps_per_tile` are the same in every warp of the block.
    for (unsigned item = 0; item < items; item += 2) {
        if (item + 1 < items) load(item + 1, odd);
        compute(item, even);
        if ((item + 1) % steps_per_tile == 0) finish(tile_of(item));
        if (item + 1 < items) {
            if (item + 2 < items) load(item + 2, even);
            compute(item + 1, odd);
            if ((item + 2) % steps_per_tile == 0) finish(tile_of(item + 1));
        }
    }
}

// out [m, n] = epilogue(x [m, k] · w[row_begin .. row_begin + n]ᵀ + bias); with ACT_SILU_GATE the
// product reads rows row_begin .. row_begin + 2n (gates, then ups) and the bias has 2n entries.
// NT = ceil(m / 8) n-tiles of x rows. addend: null, or m x n values added last.
#define NF4_LINEAR_KERNEL(suffix, T, NT)                                                          \
    extern "C" __global__ void __launch_bounds__(NF4_WARPS * 32, NF4_BLOCKS_PER_SM)              \
        nf4_linear_##suffix##_m##NT(                                                             \
            const T* __restrict__ x, const unsigned char* __restrict__ packed, const void* absmax, \
            const float* code2, const float* absmax2, const float* offset2, int nested,           \
            unsigned nested_shift, unsigned block_shift, unsigned row_begin,                      \
            const void* __restrict__ bias, int bias_kind, const T* __restrict__ addend, int act,  \
            T* __restrict__ out, unsigned m, unsigned n, unsigned k) {                            \
        linear_kernel<T, NT>(x, packed, Scales{absmax, code2, absmax2, offset2, nested, nested_shift}, \
                             block_shift, row_begin, bias, bias_kind, addend, act, out, m, n, k); \
    }
#define NF4_LINEAR_TILES(suffix, T) \
    NF4_LINEAR_KERNEL(suffix, T, 1) \
    NF4_LINEAR_KERNEL(suffix, T, 2) \
    NF4_LINEAR_KERNEL(suffix, T, 4) \
    NF4_LINEAR_KERNEL(suffix, T, 8)
NF4_LINEAR_TILES(f16, half_t)
NF4_LINEAR_TILES(bf16, bf16_t)
#undef NF4_LINEAR_TILES
#undef NF4_LINEAR_KERNEL

// ---------------------------------------------------------------------------------------------
// The decode product: one row of x
// ---------------------------------------------------------------------------------------------
//
// At a handful of rows of x the product is a pass over the packed weights, so this form is built
// like gemv.cu's split form rather than on tensor cores: a block owns ROWS weight rows (ROWS / 2
// outputs and their up rows when gated) and its warps stride over k, every lane requesting all
// of its ROWS x BATCH words before it uses any.
// - A lane's unit is one 4-byte word of packed codes (8 weights), and consecutive lanes take
//   consecutive words: each weight load is a coalesced 128-byte line, and the 8 values of x the
//   word meets are one 16-byte vector whose warp-wide load is 512 contiguous bytes (x is read
//   through L1; it is small and every block reads it). A 16-byte word per lane would leave x's
//   vectors 64 bytes apart, four times the L1 wavefronts, and L1 and shared memory share the
//   bandwidth the code lookups need.
// - Decoding: two shift-and-mask operations turn a word into the byte offsets (code * 4) of its
//   8 codes in a 16-entry f32 table in shared memory (16 entries in 16 banks: any lookup pattern
//   of a warp is one wavefront); per weight one byte permute (PRMT) extracts the offset, one
//   shared load fetches the code value, one FMA per row of x accumulates CODE[q] * x unscaled.
// - A warp step covers 32 x BATCH words of each row, 32 / ROWS chunks of 64 values: lane l
//   fetches (and for nested scales decodes) the scale of chunk l % (32 / ROWS) of row
//   l / (32 / ROWS) once, and each word's 8-value partial sums are scaled by the scale shuffled
//   from that lane: one shuffle and one FMA per row of x per 8 weights.
// - Partial sums meet in shared memory; the epilogue (bias, GELU, SwiGLU, addend) is the one
//   of the tensor-core form.
// Precision: code values and products are f32 (the tensor-core form rounds the code values to
// the activation type), scales are applied in f32, x is as stored.

// Warps per block at most: a row of k values is 32 x BATCH x warps words per step, and longer
// rows loop. 4 warps cover k = 4096 in one step at ROWS = 2. The template takes M rows of x,
// but only M = 1 is instantiated: at 4 rows (ROWS = 4) it measured 5-30% slower than the
// tensor-core form on an H100 (docs/kernels.md), which therefore keeps m >= 2.
constexpr int NF4_GEMV_MAX_WARPS = 4;
// Words each lane requests before its first multiply (ROWS x BATCH): with one lane per 32 shuffle
// sources this also makes a warp step exactly 32 chunks of 64 values over its rows.
constexpr int NF4_GEMV_LOADS = 8;

namespace {

// 4 packed bytes, read once and kept out of L1 (x should stay there).
__device__ __forceinline__ unsigned load_stream4(const unsigned char* p) {
    unsigned v;
    asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

// The code value at byte offset `offset` (code * 4) of the shared table.
__device__ __forceinline__ float code_at(const float* code, unsigned offset) {
    return *reinterpret_cast<const float*>(reinterpret_cast<const unsigned char*>(code) + offset);
}

}  // namespace

template <typename T, int M, int ROWS>
__device__ __forceinline__ void gemv_kernel(const T* __restrict__ x, const unsigned char* __restrict__ packed,
                                            Scales s, unsigned block_shift, unsigned row_begin,
                                            const void* __restrict__ bias, int bias_kind,
                                            const T* __restrict__ addend, int act, T* __restrict__ out,
                                            unsigned n, unsigned k) {
    static_assert(NF4_GEMV_LOADS % ROWS == 0 && ROWS % 2 == 0, "rows pair gates with ups");
    constexpr int BATCH = NF4_GEMV_LOADS / ROWS;
    // 64-value chunks per row and warp step, and 4-byte words per row and warp step.
    constexpr int CHUNKS = 32 / ROWS;
    constexpr int STEP_WORDS = 32 * BATCH;
    __shared__ float code[16];
    __shared__ float code2[256];
    __shared__ float partial[NF4_GEMV_MAX_WARPS][ROWS][M];

    const unsigned tid = threadIdx.x;
    const unsigned lane = tid & 31;
    const unsigned warp = tid >> 5;
    const unsigned warps = blockDim.x >> 5;
    const bool gated = act == ACT_SILU_GATE;
    const unsigned outputs = gated ? ROWS / 2 : ROWS;
    const unsigned j0 = blockIdx.x * outputs;
    // Element index of each weight row's start; rows past n (the last block of an n that the
    // block's outputs do not divide) re-read row n - 1 and are not written.
    unsigned long long start[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        unsigned row;
        if (gated) row = min(j0 + r % (ROWS / 2), n - 1) + (r >= ROWS / 2 ? n : 0);
        else row = min(j0 + r, n - 1);
        start[r] = static_cast<unsigned long long>(row_begin + row) * k;
    }
    if (tid < 16) code[tid] = NF4_CODE[tid];
    if (s.nested)
        for (unsigned i = tid; i < 256; i += blockDim.x) code2[i] = __ldg(s.code2 + i);
    __syncthreads();

    // The row and chunk whose scale this lane fetches each step.
    const unsigned scale_chunk = lane % CHUNKS;
    unsigned long long scale_row_start = start[0];
#pragma unroll
    for (int r = 1; r < ROWS; ++r)
        if (lane / CHUNKS == r) scale_row_start = start[r];

    float acc[ROWS][M];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int i = 0; i < M; ++i) acc[r][i] = 0.0f;

    const unsigned words = k / 8;
    for (unsigned base = warp * STEP_WORDS; base < words; base += warps * STEP_WORDS) {
        // Everything the step reads from DRAM is requested first: the words (past the row's end:
        // zero, and their x is zero too) and the lane's scale.
        unsigned w[BATCH][ROWS];
#pragma unroll
        for (int u = 0; u < BATCH; ++u) {
            const unsigned word = base + 32 * u + lane;
#pragma unroll
            for (int r = 0; r < ROWS; ++r)
                w[u][r] = word < words ? load_stream4(packed + start[r] / 2 + 4ull * word) : 0u;
        }
        const unsigned chunk_word = base + 8 * scale_chunk;
        const unsigned long long block = (scale_row_start + 8ull * chunk_word) >> block_shift;
        const unsigned raw = chunk_word < words ? load_scale(s, block) : 0u;
        const float scale = chunk_word < words ? decode_scale(s, raw, block, code2) : 0.0f;

#pragma unroll
        for (int u = 0; u < BATCH; ++u) {
            // The same in every lane of the warp, so every lane takes part in the shuffles.
            if (base + 32 * u >= words) break;
            const unsigned word = base + 32 * u + lane;
            float xv[M][8];
#pragma unroll
            for (int i = 0; i < M; ++i) {
                if (word < words) {
                    load_pack(x + static_cast<size_t>(i) * k + 8 * word, xv[i]);
                } else {
#pragma unroll
                    for (int e = 0; e < 8; ++e) xv[i][e] = 0.0f;
                }
            }
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const float row_scale = __shfl_sync(0xffffffffu, scale, r * CHUNKS + 4 * u + lane / 8);
                // Byte b of the word holds values 2b (high nibble) and 2b + 1 (low nibble); these
                // put each nibble times 4 in bits 2..5 of its byte.
                const unsigned hi = (w[u][r] >> 2) & 0x3c3c3c3cu;
                const unsigned lo = (w[u][r] << 2) & 0x3c3c3c3cu;
                float part[M];
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    const float c_hi = code_at(code, __byte_perm(hi, 0u, 0x4440u + b));
                    const float c_lo = code_at(code, __byte_perm(lo, 0u, 0x4440u + b));
#pragma unroll
                    for (int i = 0; i < M; ++i) {
                        part[i] = b == 0 ? c_hi * xv[i][0] : fmaf(c_hi, xv[i][2 * b], part[i]);
                        part[i] = fmaf(c_lo, xv[i][2 * b + 1], part[i]);
                    }
                }
#pragma unroll
                for (int i = 0; i < M; ++i) acc[r][i] = fmaf(row_scale, part[i], acc[r][i]);
            }
        }
    }

#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int i = 0; i < M; ++i) {
            const float sum = warp_sum(acc[r][i]);
            if (lane == 0) partial[warp][r][i] = sum;
        }
    __syncthreads();
    if (tid < outputs * M) {
        const unsigned o = tid / M;
        const unsigned i = tid % M;
        const unsigned j = j0 + o;
        if (j < n) {
            auto bias_at = [&](unsigned at) {
                if (bias_kind == BIAS_F32) return static_cast<const float*>(bias)[at];
                if (bias_kind == BIAS_SAME) return to_float(static_cast<const T*>(bias)[at]);
                return 0.0f;
            };
            float sum = bias_at(j);
            for (unsigned v = 0; v < warps; ++v) sum += partial[v][o][i];
            if (gated) {
                float up = bias_at(n + j);
                for (unsigned v = 0; v < warps; ++v) up += partial[v][ROWS / 2 + o][i];
                sum = SiluMul()(sum, up);
            } else if (act == ACT_GELU) {
                sum = GeluExact()(sum);
            } else if (act == ACT_GELU_TANH) {
                sum = GeluTanh()(sum);
            }
            const size_t at = static_cast<size_t>(i) * n + j;
            if (addend != nullptr) sum += to_float(addend[at]);
            out[at] = from_float<T>(sum);
        }
    }
}

// out [M, n] = epilogue(x [M, k] · w[row_begin .. row_begin + n]ᵀ + bias), arguments as in
// nf4_linear_* without m, for k a multiple of 64 and blocks of at least 64 values. A block
// computes 2 outputs (gated: 1) with 32..128 threads (a multiple of 32).
#define NF4_GEMV_KERNEL(suffix, T, M)                                                               \
    extern "C" __global__ void __launch_bounds__(NF4_GEMV_MAX_WARPS * 32) nf4_gemv_##suffix##_m##M( \
        const T* __restrict__ x, const unsigned char* __restrict__ packed, const void* absmax,      \
        const float* code2, const float* absmax2, const float* offset2, int nested,                \
        unsigned nested_shift, unsigned block_shift, unsigned row_begin,                           \
        const void* __restrict__ bias, int bias_kind, const T* __restrict__ addend, int act,       \
        T* __restrict__ out, unsigned n, unsigned k) {                                             \
        gemv_kernel<T, M, 2>(                                                                        \
            x, packed, Scales{absmax, code2, absmax2, offset2, nested, nested_shift}, block_shift, \
            row_begin, bias, bias_kind, addend, act, out, n, k);                                   \
    }
NF4_GEMV_KERNEL(f16, half_t, 1)
NF4_GEMV_KERNEL(bf16, bf16_t, 1)
#undef NF4_GEMV_KERNEL
