// Row normalisation: RMSNorm (Llama) and LayerNorm (GPT-NeoX), each plain and fused with the
// residual add that precedes it in a transformer block (residual += x; out = norm(residual)).
//
// One block per row; blockDim.x is a multiple of 32. Statistics are float; LayerNorm takes the
// mean first and the variance around it in a second pass (not E[x^2] - E[x]^2, which cancels
// catastrophically for rows with a large mean). The row is read from memory once: each thread
// keeps its part in registers between the passes (see CACHED_CHUNKS).
//
// Kernel names: <op>_<x dtype>_<weight dtype>, e.g. rms_norm_f16_f32 (f16 activations, f32
// weight). The bias of LayerNorm has the weight's dtype.

#include "common.cuh"

// Vector chunks of a row each thread keeps in registers between the passes over it: with the
// launcher's one thread per chunk, rows of up to 2 x 1024 x 8 elements are read from memory
// once; wider rows re-read the rest (from L1/L2, which the first pass just filled).
constexpr int CACHED_CHUNKS = 2;

// The chunk of V elements at `i` of the row being normalised: x, or with ADD the rounded sum
// residual + x, which is also stored back to the residual.
template <int V, bool ADD, typename T>
__device__ __forceinline__ void load_source(const T* __restrict__ x, T* __restrict__ residual, unsigned i,
                                            float (&v)[V]) {
    load_vec<V>(x + i, v);
    if constexpr (ADD) {
        float r[V];
        load_vec<V>(residual + i, r);
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] = round_to<T>(v[k] + r[k]);
        store_vec<V>(residual + i, v);
    }
}

// Adds the chunk's contribution to the first statistic: the sum (CENTER) or the sum of squares.
template <int V, bool CENTER>
__device__ __forceinline__ void accumulate(float& sum, const float (&v)[V]) {
#pragma unroll
    for (int k = 0; k < V; ++k) sum += CENTER ? v[k] : v[k] * v[k];
}

template <int V>
__device__ __forceinline__ void accumulate_centered(float& squares, const float (&v)[V], float mean) {
#pragma unroll
    for (int k = 0; k < V; ++k) squares += (v[k] - mean) * (v[k] - mean);
}

// Writes the normalised chunk at `i`.
template <int V, bool CENTER, typename T, typename W>
__device__ __forceinline__ void write_normalised(float (&v)[V], const W* __restrict__ weight,
                                                 const W* __restrict__ bias, T* __restrict__ out, unsigned i,
                                                 float mean, float inv_std) {
    float w[V];
    load_vec<V>(weight + i, w);
    if constexpr (CENTER) {
        float b[V];
        load_vec<V>(bias + i, b);
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] = (v[k] - mean) * inv_std * w[k] + b[k];
    } else {
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] = v[k] * inv_std * w[k];
    }
    store_vec<V>(out + i, v);
}

// Normalises one row of `hidden` elements. With ADD, `residual` is updated to the rounded sum
// residual + x first and the statistics describe the stored values; with CENTER (LayerNorm)
// the mean is subtracted and `bias` added. V is the vector width (VEC_WIDTH or 1); `hidden`
// must be a multiple of V. Thread t owns chunks t, t + blockDim.x, ...; the first
// CACHED_CHUNKS of them stay in registers, the rest are re-read by later passes (each thread
// re-reads only what it wrote itself, so the residual needs no barrier).
//
// With DUAL, the row is also normalised with a second weight and bias into out2: the two norms a
// parallel-residual block (GPT-NeoX) takes of the same residual, from one pass.
template <int V, bool ADD, bool CENTER, bool DUAL = false, typename T, typename W>
__device__ void norm_row(const T* __restrict__ x, T* __restrict__ residual, const W* __restrict__ weight,
                         const W* __restrict__ bias, T* __restrict__ out, unsigned hidden, float eps,
                         const W* __restrict__ weight2 = nullptr, const W* __restrict__ bias2 = nullptr,
                         T* __restrict__ out2 = nullptr) {
    const unsigned chunks = hidden / V;
    const unsigned uncached = threadIdx.x + CACHED_CHUNKS * blockDim.x;
    const float inv_hidden = 1.0f / static_cast<float>(hidden);
    const T* src = ADD ? residual : x;
    float cache[CACHED_CHUNKS][V];

    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < CACHED_CHUNKS; ++j) {
        const unsigned c = threadIdx.x + j * blockDim.x;
        if (c < chunks) {
            load_source<V, ADD>(x, residual, c * V, cache[j]);
            accumulate<V, CENTER>(sum, cache[j]);
        }
    }
    for (unsigned c = uncached; c < chunks; c += blockDim.x) {
        float v[V];
        load_source<V, ADD>(x, residual, c * V, v);
        accumulate<V, CENTER>(sum, v);
    }
    sum = block_sum(sum);

    float mean = 0.0f;
    float inv_std;
    if constexpr (CENTER) {
        mean = sum * inv_hidden;
        float squares = 0.0f;
#pragma unroll
        for (int j = 0; j < CACHED_CHUNKS; ++j) {
            if (threadIdx.x + j * blockDim.x < chunks) accumulate_centered(squares, cache[j], mean);
        }
        for (unsigned c = uncached; c < chunks; c += blockDim.x) {
            float v[V];
            load_vec<V>(src + c * V, v);
            accumulate_centered(squares, v, mean);
        }
        inv_std = rsqrtf(block_sum(squares) * inv_hidden + eps);
    } else {
        inv_std = rsqrtf(sum * inv_hidden + eps);
    }

#pragma unroll
    for (int j = 0; j < CACHED_CHUNKS; ++j) {
        const unsigned c = threadIdx.x + j * blockDim.x;
        if (c < chunks) {
            float copy[V];
            if constexpr (DUAL) {
#pragma unroll
                for (int k = 0; k < V; ++k) copy[k] = cache[j][k];
            }
            write_normalised<V, CENTER>(cache[j], weight, bias, out, c * V, mean, inv_std);
            if constexpr (DUAL) write_normalised<V, CENTER>(copy, weight2, bias2, out2, c * V, mean, inv_std);
        }
    }
    for (unsigned c = uncached; c < chunks; c += blockDim.x) {
        float v[V];
        load_vec<V>(src + c * V, v);
        float copy[V];
        if constexpr (DUAL) {
#pragma unroll
            for (int k = 0; k < V; ++k) copy[k] = v[k];
        }
        write_normalised<V, CENTER>(v, weight, bias, out, c * V, mean, inv_std);
        if constexpr (DUAL) write_normalised<V, CENTER>(copy, weight2, bias2, out2, c * V, mean, inv_std);
    }
}

// Picks the vector width for this launch (uniform across the grid) and normalises row blockIdx.x.
template <bool ADD, bool CENTER, typename T, typename W>
__device__ void norm(const T* x, T* residual, const W* weight, const W* bias, T* out, unsigned hidden, float eps) {
    const unsigned long long offset = static_cast<unsigned long long>(blockIdx.x) * hidden;
    x += offset;
    out += offset;
    if (ADD) residual += offset;
    // With hidden a multiple of VEC_WIDTH, every row starts 16-byte aligned iff row 0 does.
    const bool vectorised = hidden % VEC_WIDTH == 0 && is_aligned16(x) && is_aligned16(out) &&
                            is_aligned16(weight) && (!ADD || is_aligned16(residual)) &&
                            (!CENTER || is_aligned16(bias));
    if (vectorised) {
        norm_row<VEC_WIDTH, ADD, CENTER>(x, residual, weight, bias, out, hidden, eps);
    } else {
        norm_row<1, ADD, CENTER>(x, residual, weight, bias, out, hidden, eps);
    }
}

// residual += x, then out = layer_norm(residual, weight, bias) and out2 = layer_norm(residual,
// weight2, bias2) with the same eps, in one pass.
template <typename T, typename W>
__device__ void add_layer_norm_dual(const T* x, T* residual, const W* weight, const W* bias, T* out,
                                    const W* weight2, const W* bias2, T* out2, unsigned hidden, float eps) {
    const unsigned long long offset = static_cast<unsigned long long>(blockIdx.x) * hidden;
    x += offset;
    residual += offset;
    out += offset;
    out2 += offset;
    const bool vectorised = hidden % VEC_WIDTH == 0 && is_aligned16(x) && is_aligned16(residual) &&
                            is_aligned16(out) && is_aligned16(out2) && is_aligned16(weight) &&
                            is_aligned16(bias) && is_aligned16(weight2) && is_aligned16(bias2);
    if (vectorised) {
        norm_row<VEC_WIDTH, true, true, true>(x, residual, weight, bias, out, hidden, eps, weight2, bias2, out2);
    } else {
        norm_row<1, true, true, true>(x, residual, weight, bias, out, hidden, eps, weight2, bias2, out2);
    }
}

#define NORM_KERNELS(XS, T, WS, W)                                                                    \
    extern "C" __global__ void rms_norm_##XS##_##WS(const T* x, const W* weight, T* out,              \
                                                    unsigned hidden, float eps) {                      \
        norm<false, false, T, W>(x, nullptr, weight, nullptr, out, hidden, eps);                       \
    }                                                                                                  \
    extern "C" __global__ void add_rms_norm_##XS##_##WS(const T* x, T* residual, const W* weight,     \
                                                        T* out, unsigned hidden, float eps) {          \
        norm<true, false, T, W>(x, residual, weight, nullptr, out, hidden, eps);                       \
    }                                                                                                  \
    extern "C" __global__ void layer_norm_##XS##_##WS(const T* x, const W* weight, const W* bias,     \
                                                      T* out, unsigned hidden, float eps) {            \
        norm<false, true, T, W>(x, nullptr, weight, bias, out, hidden, eps);                           \
    }                                                                                                  \
    extern "C" __global__ void add_layer_norm_##XS##_##WS(const T* x, T* residual, const W* weight,   \
                                                          const W* bias, T* out, unsigned hidden,      \
                                                          float eps) {                                 \
        norm<true, true, T, W>(x, residual, weight, bias, out, hidden, eps);                           \
    }                                                                                                  \
    extern "C" __global__ void add_layer_norm_dual_##XS##_##WS(                                       \
        const T* x, T* residual, const W* weight, const W* bias, T* out, const W* weight2,            \
        const W* bias2, T* out2, unsigned hidden, float eps) {                                         \
        add_layer_norm_dual<T, W>(x, residual, weight, bias, out, weight2, bias2, out2, hidden, eps);  \
    }

NORM_KERNELS(f32, float, f32, float)
NORM_KERNELS(f16, half_t, f16, half_t)
NORM_KERNELS(f16, half_t, f32, float)
NORM_KERNELS(bf16, bf16_t, bf16, bf16_t)
NORM_KERNELS(bf16, bf16_t, f32, float)
