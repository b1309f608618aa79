// NF4 weights (crates/pagoda-kernels/src/cpu/nf4.rs is the oracle and documents the format, which
// is bitsandbytes'): decoding to a dense tensor, and products x · wᵀ that read the packed weights
// once and decode them in registers.
//
// Decoding (`nf4_dequantize_*`) computes CODE[q] * absmax with one f32 multiplication (and a
// nested scale as code8[q8] * absmax2 + offset, two separately rounded operations: __fmul_rn and
// __fadd_rn keep the compiler from contracting them into an FMA), then rounds once to the output
// type: the same bits as bitsandbytes' dequantize_4bit.
//
// The product is `nf4_gemv_*` for one row of x (at the end of the file, on tensor cores too) and
// `nf4_linear_*` for decode batches and short prefill chunks, m <= 64 rows of x (f16 or
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
// One row of x is a pass over the packed weights with little arithmetic per byte, so the
// instructions spent per weight matter: the f32 form this replaced spent a code-table load, a
// byte permute and an FMA on every weight, and measured 0-24% slower on the Llama-3.2-3B shapes
// (docs/kernels.md). This form decodes a byte into its two code values with one shared-memory
// load, as nf4_linear does, and multiplies on tensor cores, where one mma.sync takes 256
// weights:
// - A block owns a tile of 16 weight rows (gated: 8 gate rows, then their up rows), the MMA's
//   A rows g and g + 8 for lane (g, q) = (lane / 4, lane % 4). Its warps split k into groups of
//   512: four spans of 128, in each of which lane (g, q) loads 16 bytes of row g and 16 of row
//   g + 8 (the 32 values from 32q), so a warp's group is 8 16-byte loads per lane, all requested
//   before the first multiply (with up to two groups per warp in one batch).
// - MMA j of a span takes bytes 2j and 2j + 1 of each 16 (a byte is one A register: two values
//   of one row); the pair table maps a byte to its two unscaled code values in f16x2/bf16x2,
//   32 lane copies so that every lane reads its own bank. The address of a byte's entry is one
//   byte permute and one shift-and-add: on sm_90 the table's shared-window address carries the
//   block's cluster rank, so it stays in a register.
// - One row of x would fill one column of B; the 8 columns carry the scales' granularity
//   instead. Column g holds x for the chunk of 64 whose index in the group is g, i.e. span g / 2
//   in the lanes with q / 2 == g % 2, and zeros elsewhere. So C[row][c] sums chunk c of the
//   group unscaled, over all four spans and 32 MMAs, and is scaled once per row and chunk in f32
//   at the end of the group (lane (g, q) holds chunks 2q and 2q + 1 of rows g and g + 8, whose
//   raw scales it loaded with its weights; a nested scale is finished with the shared copy of
//   the 256-entry code and its group's scale and offset, read during the MMAs).
// - Per lane, x for one span of the four (or none): 64 bytes read through L1 at the start of
//   the group's multiplies.
// - Partial sums meet in shared memory across warps; the epilogue (bias, GELU, SwiGLU over the
//   tile's gate and up rows, addend) is the one of the tensor-core form.
// Precision: as nf4_linear's: code values rounded to the activation type, exact products,
// f32 accumulation and scaling.

// Most warps per block (the launch bound); a block owns one tile of 16 weight rows.
constexpr int NF4_GEMV_TILE_WARPS = 8;
// k values of a row that the four lanes of a quad cover with one 16-byte load each (a span),
// and k values of a warp's group: 4 spans, 8 chunks of 64, the 8 columns of B and C.
constexpr unsigned NF4_GEMV_SPAN = 128;
constexpr unsigned NF4_GEMV_GROUP = 4 * NF4_GEMV_SPAN;

namespace {

// 16 packed bytes, read once and kept out of L1 (x should stay there).
__device__ __forceinline__ uint4 load_stream16(const unsigned char* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

__device__ __forceinline__ unsigned word_of(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// The pair-table entry of byte BYTE of `word` for the lane whose own column of the table is at
// shared-window address `lane_column` (the table's address plus lane * 4).
template <int BYTE>
__device__ __forceinline__ unsigned pair_entry(unsigned word, unsigned lane_column) {
    const unsigned address = (__byte_perm(word, 0u, 0x4440u + BYTE) << 7) + lane_column;
    unsigned v;
    asm("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(address));
    return v;
}

// A warp's loads for NB groups: the 16 bytes of rows g and g + 8 in each span, and the raw
// scales of chunks 2q and 2q + 1 of both rows.
template <int NB> struct GemvBatch {
    uint4 w[NB][4][2];
    unsigned raw[NB][2][2];
};

}  // namespace

template <typename T, int NB>
__device__ __forceinline__ void gemv_kernel(const T* __restrict__ x, const unsigned char* __restrict__ packed,
                                            Scales s, unsigned block_shift, unsigned row_begin,
                                            const void* __restrict__ bias, int bias_kind,
                                            const T* __restrict__ addend, int act, T* __restrict__ out,
                                            unsigned n, unsigned k) {
    __shared__ __align__(16) unsigned char pair_table[256 * TABLE_COPIES * 4];
    __shared__ float code2[256];
    __shared__ float partial[NF4_GEMV_TILE_WARPS][16];

    const unsigned tid = threadIdx.x;
    const unsigned lane = tid & 31;
    const unsigned warp = tid >> 5;
    const unsigned warps = blockDim.x >> 5;
    const unsigned g = lane >> 2;
    const unsigned q = lane & 3;
    const bool gated = act == ACT_SILU_GATE;
    const unsigned outputs = gated ? 8 : 16;
    const unsigned j0 = blockIdx.x * outputs;
    // Element index of the starts of A rows g and g + 8 (gated: a gate row and its up row). Rows
    // past n re-read row n - 1 and are not written.
    unsigned long long start[2];
    if (gated) {
        const unsigned j = min(j0 + g, n - 1);
        start[0] = static_cast<unsigned long long>(row_begin + j) * k;
        start[1] = static_cast<unsigned long long>(row_begin + n + j) * k;
    } else {
        start[0] = static_cast<unsigned long long>(row_begin + min(j0 + g, n - 1)) * k;
        start[1] = static_cast<unsigned long long>(row_begin + min(j0 + g + 8, n - 1)) * k;
    }
    const unsigned groups = (k + NF4_GEMV_GROUP - 1) / NF4_GEMV_GROUP;

    // Groups warp, warp + warps, ... of the tile; batch i0 is the NB groups from the i0-th.
    // Past the row's end: zero bytes and scales (and zero x, so they add nothing).
    auto load = [&](unsigned i0, GemvBatch<NB>& b) {
#pragma unroll
        for (int u = 0; u < NB; ++u) {
            const unsigned kg = (warp + (i0 + u) * warps) * NF4_GEMV_GROUP;
#pragma unroll
            for (int sp = 0; sp < 4; ++sp) {
                const unsigned kk = kg + sp * NF4_GEMV_SPAN + 32 * q;
#pragma unroll
                for (int r = 0; r < 2; ++r)
                    b.w[u][sp][r] = kk < k ? load_stream16(packed + (start[r] + kk) / 2) : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const unsigned kc = kg + 64 * (2 * q + c);
                    b.raw[u][r][c] = kc < k ? load_scale(s, (start[r] + kc) >> block_shift) : 0u;
                }
        }
    };

    // B's column g collects chunk g of a group: span g / 2 in lanes q / 2 == g % 2. So this lane
    // holds x (for its own 32 k of that span) in the B fragments of one span, or of none (4).
    const int diff = static_cast<int>(g) - static_cast<int>(q >> 1);
    const unsigned my_span = diff >= 0 && (diff & 1) == 0 ? static_cast<unsigned>(diff) >> 1 : 4u;
    const unsigned lane_column = static_cast<unsigned>(__cvta_generic_to_shared(pair_table)) + lane * 4;
    float acc[2] = {0.0f, 0.0f};

    auto compute = [&](unsigned i0, const GemvBatch<NB>& b) {
#pragma unroll
        for (int u = 0; u < NB; ++u) {
            const unsigned group = warp + (i0 + u) * warps;
            // The same in every lane: whole warps run the MMAs.
            if (group >= groups) break;
            const unsigned kg = group * NF4_GEMV_GROUP;
            uint4 xv[4];
            const unsigned kx = kg + my_span * NF4_GEMV_SPAN + 32 * q;
#pragma unroll
            for (int i = 0; i < 4; ++i)
                xv[i] = my_span < 4 && kx < k ? reinterpret_cast<const uint4*>(x + kx)[i] : make_uint4(0u, 0u, 0u, 0u);
            // The nested scales' second level, read now and needed after the MMAs.
            float absmax2[2][2], offset2[2][2];
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const unsigned kc = kg + 64 * (2 * q + c);
                    absmax2[r][c] = 0.0f;
                    offset2[r][c] = 0.0f;
                    if (s.nested && kc < k) {
                        const unsigned long long nested_group = ((start[r] + kc) >> block_shift) >> s.nested_shift;
                        absmax2[r][c] = __ldg(s.absmax2 + nested_group);
                        offset2[r][c] = __ldg(s.offset2 + nested_group);
                    }
                }
            float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int sp = 0; sp < 4; ++sp) {
                if (kg + sp * NF4_GEMV_SPAN >= k) break;
                const bool mine = my_span == static_cast<unsigned>(sp);
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const unsigned wa = word_of(b.w[u][sp][0], j / 2);
                    const unsigned wb = word_of(b.w[u][sp][1], j / 2);
                    unsigned a[4];
                    if (j % 2 == 0) {
                        a[0] = pair_entry<0>(wa, lane_column);
                        a[1] = pair_entry<0>(wb, lane_column);
                        a[2] = pair_entry<1>(wa, lane_column);
                        a[3] = pair_entry<1>(wb, lane_column);
                    } else {
                        a[0] = pair_entry<2>(wa, lane_column);
                        a[1] = pair_entry<2>(wb, lane_column);
                        a[2] = pair_entry<3>(wa, lane_column);
                        a[3] = pair_entry<3>(wb, lane_column);
                    }
                    const unsigned b0 = mine ? word_of(xv[j / 2], 2 * (j % 2)) : 0u;
                    const unsigned b1 = mine ? word_of(xv[j / 2], 2 * (j % 2) + 1) : 0u;
                    mma_16816<T>(part, a, b0, b1);
                }
            }
            float scale[2][2];
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const unsigned raw = b.raw[u][r][c];
                    scale[r][c] = s.nested ? __fadd_rn(__fmul_rn(code2[raw], absmax2[r][c]), offset2[r][c])
                                           : __uint_as_float(raw);
                }
            acc[0] = fmaf(scale[0][0], part[0], acc[0]);
            acc[0] = fmaf(scale[0][1], part[1], acc[0]);
            acc[1] = fmaf(scale[1][0], part[2], acc[1]);
            acc[1] = fmaf(scale[1][1], part[3], acc[1]);
        }
    };

    GemvBatch<NB> batch;
    load(0, batch);
    // The first batch is in flight while the tables are built.
    for (unsigned i = tid; i < 256 * TABLE_COPIES / 4; i += blockDim.x) {
        const unsigned byte = i / (TABLE_COPIES / 4);
        const unsigned pair = pack2<T>(NF4_CODE[byte >> 4], NF4_CODE[byte & 15]);
        reinterpret_cast<uint4*>(pair_table)[i] = make_uint4(pair, pair, pair, pair);
    }
    if (s.nested)
        for (unsigned i = tid; i < 256; i += blockDim.x) code2[i] = __ldg(s.code2 + i);
    __syncthreads();

    const unsigned per_warp = (groups + warps - 1) / warps;
    for (unsigned i0 = 0; i0 < per_warp; i0 += NB) {
        if (i0 > 0) load(i0, batch);
        compute(i0, batch);
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], 1);
        acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], 2);
    }
    if (q == 0) {
        partial[warp][g] = acc[0];
        partial[warp][g + 8] = acc[1];
    }
    __syncthreads();
    if (tid < outputs) {
        const unsigned j = j0 + tid;
        if (j < n) {
            auto bias_at = [&](unsigned at) {
                if (bias_kind == BIAS_F32) return static_cast<const float*>(bias)[at];
                if (bias_kind == BIAS_SAME) return to_float(static_cast<const T*>(bias)[at]);
                return 0.0f;
            };
            float sum = bias_at(j);
            for (unsigned v = 0; v < warps; ++v) sum += partial[v][tid];
            if (gated) {
                float up = bias_at(n + j);
                for (unsigned v = 0; v < warps; ++v) up += partial[v][tid + 8];
                sum = SiluMul()(sum, up);
            } else if (act == ACT_GELU) {
                sum = GeluExact()(sum);
            } else if (act == ACT_GELU_TANH) {
                sum = GeluTanh()(sum);
            }
            if (addend != nullptr) sum += to_float(addend[j]);
            out[j] = from_float<T>(sum);
        }
    }
}

// out [1, n] = epilogue(x [1, k] · w[row_begin .. row_begin + n]ᵀ + bias), arguments as in
// nf4_linear_* without m, for k a multiple of 64 and blocks of at least 64 values: one block of
// 32..256 threads per tile of 16 outputs (gated: 8); NB groups of 512 k per warp and batch.
#define NF4_GEMV_KERNEL(suffix, T, NB)                                                               \
    extern "C" __global__ void __launch_bounds__(NF4_GEMV_TILE_WARPS * 32, 2) nf4_gemv_##suffix##_m1_g##NB( \
        const T* __restrict__ x, const unsigned char* __restrict__ packed, const void* absmax,       \
        const float* code2, const float* absmax2, const float* offset2, int nested,                 \
        unsigned nested_shift, unsigned block_shift, unsigned row_begin,                            \
        const void* __restrict__ bias, int bias_kind, const T* __restrict__ addend, int act,        \
        T* __restrict__ out, unsigned n, unsigned k) {                                              \
        gemv_kernel<T, NB>(x, packed, Scales{absmax, code2, absmax2, offset2, nested, nested_shift}, \
                           block_shift, row_begin, bias, bias_kind, addend, act, out, n, k);        \
    }
NF4_GEMV_KERNEL(f16, half_t, 1)
NF4_GEMV_KERNEL(f16, half_t, 2)
NF4_GEMV_KERNEL(bf16, bf16_t, 1)
NF4_GEMV_KERNEL(bf16, bf16_t, 2)
#undef NF4_GEMV_KERNEL
