// Skinny matrix products for decode: out[m, n] = x[m, k] · w[n, k]ᵀ (+ bias[n]) for m <= 8.
//
// At small m a product is a pass over the weights, so the kernels are built to read every weight
// exactly once at full memory bandwidth, and multiply every loaded weight vector against all m
// rows of x. x itself is small (m x k elements) and shared by every thread, so it is read
// through the L1 cache rather than staged in shared memory: no k tiling is needed for k up to the
// widest hidden sizes. Two forms, chosen by the launcher from n:
// - `gemv_*`, one warp per GEMV_ROWS output columns j (weight rows), streaming whole rows with
//   16-byte loads, GEMV_BATCH words per row in flight, combined by one warp reduction per output:
//   no block barrier at all, the fastest form once n gives the GPU a full wave of warps (the
//   lm head: 128256 rows);
// - `gemv_split_*`, one block per GEMV_SPLIT_ROWS output columns with the whole block striding
//   over k, partial sums meeting in shared memory: narrow layers (n of a few thousand) keep every
//   SM busy, which one warp per row cannot.
// Partial sums are f32 per lane; the bias is added in f32 and the result rounded once to the
// output dtype. The split form also applies an epilogue before that rounding, so the elementwise
// kernel that would follow the product (and its round trip through memory) disappears: GELU,
// SwiGLU's silu(gate) * up over a fused [gate; up] matrix, or the addition of another tensor.

#include "common.cuh"
#include "activation.cuh"

// The largest m this kernel takes; the launcher sends bigger products to cuBLAS.
constexpr int GEMV_MAX_M = 8;
// Weight rows per warp: each x vector loaded is used this many times.
constexpr int GEMV_ROWS = 2;

// bias_kind: what `bias` points to.
constexpr int BIAS_NONE = 0;
constexpr int BIAS_F32 = 1;
constexpr int BIAS_SAME = 2;

// act: the epilogue's activation. With ACT_SILU_GATE the weight holds 2n rows, gates then ups,
// and output j is silu(gate row j . x) * (up row j . x).
constexpr int ACT_NONE = 0;
constexpr int ACT_GELU = 1;
constexpr int ACT_GELU_TANH = 2;
constexpr int ACT_SILU_GATE = 3;

// 16-byte steps of each weight row a warp requests before using the first one.
constexpr int GEMV_BATCH = 4;

// One 16-byte step of the vectorized loop: the GEMV_ROWS weight words `raw` (elements c ..
// c + Pack<T>::N of each row) against the same columns of every row of x.
template <typename T, int ROWS = GEMV_ROWS>
__device__ __forceinline__ void gemv_step(const T* __restrict__ x, const uint4 (&raw)[ROWS],
                                          unsigned c, unsigned m, unsigned k,
                                          float (&acc)[ROWS][GEMV_MAX_M]) {
    constexpr int P = Pack<T>::N;
    float wv[ROWS][P];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const T* elems = reinterpret_cast<const T*>(&raw[r]);
#pragma unroll
        for (int e = 0; e < P; ++e) wv[r][e] = to_float(elems[e]);
    }
#pragma unroll
    for (int i = 0; i < GEMV_MAX_M; ++i) {
        if (i < m) {
            float xv[P];
            load_pack(x + static_cast<size_t>(i) * k + c, xv);
#pragma unroll
            for (int r = 0; r < ROWS; ++r)
#pragma unroll
                for (int e = 0; e < P; ++e) acc[r][i] = fmaf(wv[r][e], xv[e], acc[r][i]);
        }
    }
}

template <typename T>
__device__ __forceinline__ void gemv_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                            const void* __restrict__ bias, int bias_kind,
                                            T* __restrict__ out, unsigned m, unsigned n,
                                            unsigned k) {
    const unsigned lane = threadIdx.x & 31;
    const unsigned warp = threadIdx.x >> 5;
    const unsigned warps = blockDim.x >> 5;
    const unsigned row0 = (blockIdx.x * warps + warp) * GEMV_ROWS;
    // Whole warps leave together; nothing below synchronises the block.
    if (row0 >= n) return;

    // Rows past n (the last warp of an odd n) re-read row n - 1 and are not written.
    const T* w_rows[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) {
        const unsigned j = min(row0 + r, n - 1);
        w_rows[r] = w + static_cast<size_t>(j) * k;
    }

    float acc[GEMV_ROWS][GEMV_MAX_M];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r)
#pragma unroll
        for (int i = 0; i < GEMV_MAX_M; ++i) acc[r][i] = 0.0f;

    constexpr int P = Pack<T>::N;
    // Every row starts 16-byte aligned only when both base pointers are and k fills whole
    // 16-byte words; otherwise (odd k, a view at an odd offset) the scalar loop runs.
    const bool vectorized = (k % P == 0) && is_aligned16(x) && is_aligned16(w);
    if (vectorized) {
        const unsigned stride = 32u * P;
        unsigned c = lane * P;
        // Whole batches first: all GEMV_BATCH x GEMV_ROWS weight words of a batch are requested
        // before the first is used, so enough bytes are in flight per warp to cover the memory
        // latency (the branches on m below would otherwise keep the compiler from hoisting the
        // next step's loads).
        for (; c + (GEMV_BATCH - 1) * stride < k; c += GEMV_BATCH * stride) {
            uint4 raw[GEMV_BATCH][GEMV_ROWS];
#pragma unroll
            for (int u = 0; u < GEMV_BATCH; ++u)
#pragma unroll
                for (int r = 0; r < GEMV_ROWS; ++r)
                    raw[u][r] = *reinterpret_cast<const uint4*>(w_rows[r] + c + u * stride);
#pragma unroll
            for (int u = 0; u < GEMV_BATCH; ++u) gemv_step<T>(x, raw[u], c + u * stride, m, k, acc);
        }
        for (; c < k; c += stride) {
            uint4 raw[GEMV_ROWS];
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; ++r)
                raw[r] = *reinterpret_cast<const uint4*>(w_rows[r] + c);
            gemv_step<T>(x, raw, c, m, k, acc);
        }
    } else {
        for (unsigned c = lane; c < k; c += 32) {
            float wv[GEMV_ROWS];
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; ++r) wv[r] = to_float(w_rows[r][c]);
#pragma unroll
            for (int i = 0; i < GEMV_MAX_M; ++i) {
                if (i < m) {
                    const float xv = to_float(x[static_cast<size_t>(i) * k + c]);
#pragma unroll
                    for (int r = 0; r < GEMV_ROWS; ++r) acc[r][i] = fmaf(wv[r], xv, acc[r][i]);
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) {
        const unsigned j = row0 + r;
        float b = 0.0f;
        if (j < n && bias_kind != BIAS_NONE) {
            if (bias_kind == BIAS_F32) b = static_cast<const float*>(bias)[j];
            else if (bias_kind == BIAS_SAME) b = to_float(static_cast<const T*>(bias)[j]);
        }
#pragma unroll
        for (int i = 0; i < GEMV_MAX_M; ++i) {
            // `i < m` is the same in every lane, so the whole warp takes part in the shuffle.
            if (i < m) {
                const float sum = warp_sum(acc[r][i]);
                if (lane == 0 && j < n) out[static_cast<size_t>(i) * n + j] = from_float<T>(sum + b);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The block-split form: a block of whole warps owns ROWS weight rows and every thread of the block
// strides over k, so a narrow layer (n = 1024) still fills every SM with loads, and each thread
// requests BATCH x ROWS 16-byte words before its first multiply. Weights are read with
// `ld.global.nc.L1::no_allocate` when STREAM: read-only for the kernel's life and used once, they
// should not evict x from L1. The partial sums meet in shared memory once, at the end.
// ---------------------------------------------------------------------------------------------

// The most warps of a block-split launch (the launcher uses at most 256 threads).
constexpr int GEMV_MAX_WARPS = 8;
// Weight rows per block and 16-byte words per row each thread requests at once: 8 words in
// flight per thread. Measured on an H200 beside 4 rows x 2 words (as fast overall) and plain
// loads (5-15% slower than the streaming ones).
constexpr int GEMV_SPLIT_ROWS = 2;
constexpr int GEMV_SPLIT_BATCH = 4;

template <bool STREAM>
__device__ __forceinline__ uint4 load_weights(const void* p) {
    if constexpr (STREAM) {
        uint4 v;
        asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
            : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
            : "l"(p));
        return v;
    } else {
        return *reinterpret_cast<const uint4*>(p);
    }
}

// The bias of weight row `row`, in f32 (0 without one).
template <typename T>
__device__ __forceinline__ float bias_of(const void* __restrict__ bias, int bias_kind, unsigned row) {
    if (bias_kind == BIAS_F32) return static_cast<const float*>(bias)[row];
    if (bias_kind == BIAS_SAME) return to_float(static_cast<const T*>(bias)[row]);
    return 0.0f;
}

// acc[r][i] += the dot product of weight row w_rows[r] with row i of x (m x k, row stride k), the
// whole block striding over k.
template <typename T, int ROWS, int BATCH, bool STREAM>
__device__ __forceinline__ void accumulate_split(const T* __restrict__ x, const T* __restrict__ w,
                                                 const T* (&w_rows)[ROWS], unsigned m, unsigned k,
                                                 float (&acc)[ROWS][GEMV_MAX_M]) {
    const unsigned tid = threadIdx.x;
    const unsigned threads = blockDim.x;
    constexpr int P = Pack<T>::N;
    const bool vectorized = (k % P == 0) && is_aligned16(x) && is_aligned16(w);
    if (vectorized) {
        const unsigned words = k / P;
        for (unsigned c = tid; c < words; c += BATCH * threads) {
            // Loads past the row's end are skipped (their words are never used), so the
            // whole batch, the last one included, is requested before any multiply.
            uint4 raw[BATCH][ROWS];
#pragma unroll
            for (int u = 0; u < BATCH; ++u) {
                const unsigned word = c + u * threads;
#pragma unroll
                for (int r = 0; r < ROWS; ++r)
                    raw[u][r] = word < words
                                    ? load_weights<STREAM>(w_rows[r] + static_cast<size_t>(word) * P)
                                    : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int u = 0; u < BATCH; ++u) {
                const unsigned word = c + u * threads;
                if (word < words) gemv_step<T, ROWS>(x, raw[u], word * P, m, k, acc);
            }
        }
    } else {
        for (unsigned c = tid; c < k; c += threads) {
            float wv[ROWS];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) wv[r] = to_float(w_rows[r][c]);
#pragma unroll
            for (int i = 0; i < GEMV_MAX_M; ++i) {
                if (i < m) {
                    const float xv = to_float(x[static_cast<size_t>(i) * k + c]);
#pragma unroll
                    for (int r = 0; r < ROWS; ++r) acc[r][i] = fmaf(wv[r], xv, acc[r][i]);
                }
            }
        }
    }
}

template <typename T, int ROWS, int BATCH, bool STREAM>
__device__ __forceinline__ void gemv_split_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                  const void* __restrict__ bias, int bias_kind,
                                                  const T* __restrict__ x2, const T* __restrict__ w2,
                                                  const void* __restrict__ bias2, int bias2_kind,
                                                  unsigned k2, const T* __restrict__ addend, int act,
                                                  T* __restrict__ out, unsigned m, unsigned n,
                                                  unsigned k, unsigned block) {
    static_assert(ROWS == 2, "the gated epilogue pairs a gate row with its up row");
    __shared__ float partial[GEMV_MAX_WARPS][ROWS * GEMV_MAX_M];
    const unsigned tid = threadIdx.x;
    const unsigned threads = blockDim.x;
    const unsigned lane = tid & 31;
    const unsigned warp = tid >> 5;
    const bool gated = act == ACT_SILU_GATE;
    // Gated: this block's output column j and its weight rows j (gate) and n + j (up).
    // Otherwise ROWS consecutive output columns; rows past n (the last block of an n that ROWS
    // does not divide) re-read row n - 1 and are not written.
    const unsigned row0 = gated ? block : block * ROWS;
    unsigned rows[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) rows[r] = gated ? row0 + r * n : min(row0 + r, n - 1);
    const T* w_rows[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) w_rows[r] = w + static_cast<size_t>(rows[r]) * k;

    float acc[ROWS][GEMV_MAX_M];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int i = 0; i < GEMV_MAX_M; ++i) acc[r][i] = 0.0f;

    accumulate_split<T, ROWS, BATCH, STREAM>(x, w, w_rows, m, k, acc);
    if (k2 > 0) {
        // The second product's weight rows are the same output columns of w2.
        const T* w2_rows[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) w2_rows[r] = w2 + static_cast<size_t>(rows[r]) * k2;
        accumulate_split<T, ROWS, BATCH, STREAM>(x2, w2, w2_rows, m, k2, acc);
    }

    // `i < m` is the same in every lane, so whole warps take part in each shuffle.
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int i = 0; i < GEMV_MAX_M; ++i)
            if (i < m) {
                const float sum = warp_sum(acc[r][i]);
                if (lane == 0) partial[warp][r * GEMV_MAX_M + i] = sum;
            }
    __syncthreads();
    const unsigned outputs = gated ? m : ROWS * m;
    if (tid < outputs) {
        const unsigned r = tid / m;
        const unsigned i = tid % m;
        const unsigned j = row0 + r;
        if (j < n) {
            float sum = bias_of<T>(bias, bias_kind, rows[r]);
            if (k2 > 0) sum += bias_of<T>(bias2, bias2_kind, rows[r]);
            for (unsigned v = 0; v < threads / 32; ++v) sum += partial[v][r * GEMV_MAX_M + i];
            if (gated) {
                float up = bias_of<T>(bias, bias_kind, rows[1]);
                for (unsigned v = 0; v < threads / 32; ++v) up += partial[v][GEMV_MAX_M + i];
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

#define GEMV_KERNEL(suffix, T)                                                                  \
    extern "C" __global__ void gemv_##suffix(const T* __restrict__ x, const T* __restrict__ w,  \
                                             const void* __restrict__ bias, int bias_kind,      \
                                             T* __restrict__ out, unsigned m, unsigned n,       \
                                             unsigned k) {                                      \
        gemv_kernel<T>(x, w, bias, bias_kind, out, m, n, k);                                    \
    }
PAGODA_FOR_EACH_FLOAT(GEMV_KERNEL)
#undef GEMV_KERNEL

// x2, w2, bias2, k2: a second product (and its bias) summed into the first (x2 is m x k2, w2
// n x k2), or k2 = 0.
// addend: null, or m x n values added to the outputs last. With ACT_SILU_GATE, w holds 2n rows
// (and k2 is 0).
#define GEMV_SPLIT_KERNEL(suffix, T)                                                            \
    extern "C" __global__ void gemv_split_##suffix(                                             \
        const T* __restrict__ x, const T* __restrict__ w, const void* __restrict__ bias,        \
        int bias_kind, const T* __restrict__ x2, const T* __restrict__ w2,                      \
        const void* __restrict__ bias2, int bias2_kind, unsigned k2,                            \
        const T* __restrict__ addend, int act, T* __restrict__ out, unsigned m, unsigned n,     \
        unsigned k) {                                                                           \
        gemv_split_kernel<T, GEMV_SPLIT_ROWS, GEMV_SPLIT_BATCH, true>(                          \
            x, w, bias, bias_kind, x2, w2, bias2, bias2_kind, k2, addend, act, out, m, n, k,    \
            blockIdx.x);                                                                        \
    }
PAGODA_FOR_EACH_FLOAT(GEMV_SPLIT_KERNEL)
#undef GEMV_SPLIT_KERNEL

// ---------------------------------------------------------------------------------------------
// Two independent split-form products in one launch: the first `a.blocks` blocks compute `a`,
// the rest `b`. Two products that do not depend on each other (GPT-NeoX's QKV projection and
// MLP up projection, whose inputs come out of one norm kernel) then share one ramp-up and one
// drain of the GPU instead of paying each.
// ---------------------------------------------------------------------------------------------

// The arguments of gemv_split, as one struct (GemvProblem in gemv.rs, field for field).
struct GemvProblem {
    const void* x;
    const void* w;
    const void* bias;
    const void* x2;
    const void* w2;
    const void* bias2;
    const void* addend;
    void* out;
    int bias_kind;
    int bias2_kind;
    int act;
    unsigned k2;
    unsigned m;
    unsigned n;
    unsigned k;
    // Blocks of the grid this problem takes.
    unsigned blocks;
};

template <typename T>
__device__ __forceinline__ void gemv_split_problem(const GemvProblem& p, unsigned block) {
    gemv_split_kernel<T, GEMV_SPLIT_ROWS, GEMV_SPLIT_BATCH, true>(
        static_cast<const T*>(p.x), static_cast<const T*>(p.w), p.bias, p.bias_kind,
        static_cast<const T*>(p.x2), static_cast<const T*>(p.w2), p.bias2, p.bias2_kind, p.k2,
        static_cast<const T*>(p.addend), p.act, static_cast<T*>(p.out), p.m, p.n, p.k, block);
}

#define GEMV_SPLIT_PAIR_KERNEL(suffix, T)                                                       \
    extern "C" __global__ void gemv_split_pair_##suffix(GemvProblem a, GemvProblem b) {         \
        if (blockIdx.x < a.blocks) {                                                            \
            gemv_split_problem<T>(a, blockIdx.x);                                               \
        } else {                                                                                \
            gemv_split_problem<T>(b, blockIdx.x - a.blocks);                                    \
        }                                                                                       \
    }
PAGODA_FOR_EACH_FLOAT(GEMV_SPLIT_PAIR_KERNEL)
#undef GEMV_SPLIT_PAIR_KERNEL
