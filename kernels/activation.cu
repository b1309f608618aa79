// Elementwise kernels: GELU (exact and tanh-approximated, GPT-NeoX), the SwiGLU gate
// silu(gate) * up (Llama), elementwise add, and the row broadcast that seeds a GEMM output with
// its bias. Math in float; each result is rounded once to the output dtype.
//
// Grid-stride loops over the flattened tensors. When every pointer is 16-byte aligned the bulk
// moves in vectors of VEC_WIDTH elements and the remainder one element at a time.

#include "common.cuh"
#include "activation.cuh"

struct Add {
    __device__ float operator()(float a, float b) const { return a + b; }
};

__device__ __forceinline__ unsigned long long global_thread() {
    return static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ unsigned long long grid_threads() {
    return static_cast<unsigned long long>(gridDim.x) * blockDim.x;
}

template <typename T, typename F>
__device__ void map_unary(const T* __restrict__ x, T* __restrict__ out, unsigned long long n, F f) {
    const unsigned long long first = global_thread();
    const unsigned long long stride = grid_threads();
    unsigned long long done = 0;
    if (is_aligned16(x) && is_aligned16(out)) {
        const unsigned long long chunks = n / VEC_WIDTH;
        for (unsigned long long c = first; c < chunks; c += stride) {
            float v[VEC_WIDTH];
            load_vec<VEC_WIDTH>(x + c * VEC_WIDTH, v);
#pragma unroll
            for (int k = 0; k < VEC_WIDTH; ++k) v[k] = f(v[k]);
            store_vec<VEC_WIDTH>(out + c * VEC_WIDTH, v);
        }
        done = chunks * VEC_WIDTH;
    }
    for (unsigned long long i = done + first; i < n; i += stride) out[i] = from_float<T>(f(to_float(x[i])));
}

template <typename T, typename F>
__device__ void map_binary(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out,
                           unsigned long long n, F f) {
    const unsigned long long first = global_thread();
    const unsigned long long stride = grid_threads();
    unsigned long long done = 0;
    if (is_aligned16(a) && is_aligned16(b) && is_aligned16(out)) {
        const unsigned long long chunks = n / VEC_WIDTH;
        for (unsigned long long c = first; c < chunks; c += stride) {
            float u[VEC_WIDTH], v[VEC_WIDTH];
            load_vec<VEC_WIDTH>(a + c * VEC_WIDTH, u);
            load_vec<VEC_WIDTH>(b + c * VEC_WIDTH, v);
#pragma unroll
            for (int k = 0; k < VEC_WIDTH; ++k) u[k] = f(u[k], v[k]);
            store_vec<VEC_WIDTH>(out + c * VEC_WIDTH, u);
        }
        done = chunks * VEC_WIDTH;
    }
    for (unsigned long long i = done + first; i < n; i += stride)
        out[i] = from_float<T>(f(to_float(a[i]), to_float(b[i])));
}

// out[r, c] = row[c] for a rows x cols output.
template <typename T, typename W>
__device__ void broadcast_rows(const W* __restrict__ row, T* __restrict__ out, unsigned rows, unsigned cols) {
    const unsigned long long n = static_cast<unsigned long long>(rows) * cols;
    for (unsigned long long i = global_thread(); i < n; i += grid_threads())
        out[i] = from_float<T>(to_float(row[i % cols]));
}

#define ELEMENTWISE_KERNELS(S, T)                                                                      \
    extern "C" __global__ void gelu_##S(const T* x, T* out, unsigned long long n) {                    \
        map_unary(x, out, n, GeluExact{});                                                             \
    }                                                                                                  \
    extern "C" __global__ void gelu_tanh_##S(const T* x, T* out, unsigned long long n) {               \
        map_unary(x, out, n, GeluTanh{});                                                              \
    }                                                                                                  \
    extern "C" __global__ void silu_and_mul_##S(const T* gate, const T* up, T* out, unsigned long long n) { \
        map_binary(gate, up, out, n, SiluMul{});                                                       \
    }                                                                                                  \
    extern "C" __global__ void add_##S(const T* a, const T* b, T* out, unsigned long long n) {         \
        map_binary(a, b, out, n, Add{});                                                               \
    }

PAGODA_FOR_EACH_FLOAT(ELEMENTWISE_KERNELS)

#define BROADCAST_KERNEL(S, T, WS, W)                                                                  \
    extern "C" __global__ void broadcast_rows_##S##_##WS(const W* row, T* out, unsigned rows, unsigned cols) { \
        broadcast_rows(row, out, rows, cols);                                                          \
    }

BROADCAST_KERNEL(f32, float, f32, float)
BROADCAST_KERNEL(f16, half_t, f16, half_t)
BROADCAST_KERNEL(f16, half_t, f32, float)
BROADCAST_KERNEL(bf16, bf16_t, bf16, bf16_t)
BROADCAST_KERNEL(bf16, bf16_t, f32, float)
