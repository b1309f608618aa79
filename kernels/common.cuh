// Shared device code for the pagoda kernels: storage types for half and bfloat16 with their
// conversions to and from float, 128-bit packed loads and stores, and warp/block reductions.
//
// Deliberately free of CUDA headers (cuda_fp16.h, cuda_bf16.h): whether NVRTC ships them built in
// depends on its version, and the kernels only need the conversions, which are single PTX
// instructions. Everything a kernel computes is done in float.

#pragma once

// ---------------------------------------------------------------------------------------------
// Storage types. A kernel is written once as a template over `float`, `half_t` or `bf16_t` and
// instantiated per dtype with the suffixes `_f32`, `_f16`, `_bf16` (see PAGODA_FOR_EACH_FLOAT).
// ---------------------------------------------------------------------------------------------

// IEEE 754 binary16, as stored; the same bits as `half` / Rust's `half::f16`.
struct alignas(2) half_t {
    unsigned short bits;
};

// bfloat16 (the upper half of an IEEE binary32), as stored; the same bits as Rust's `half::bf16`.
struct alignas(2) bf16_t {
    unsigned short bits;
};

__device__ __forceinline__ float to_float(float x) { return x; }

__device__ __forceinline__ float to_float(half_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

__device__ __forceinline__ float to_float(bf16_t x) {
    return __uint_as_float(static_cast<unsigned int>(x.bits) << 16);
}

// Conversion from float with round-to-nearest-even, as `half::f16::from_f32` does.
template <typename T> __device__ __forceinline__ T from_float(float x);

template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }

template <> __device__ __forceinline__ half_t from_float<half_t>(float x) {
    half_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
    return h;
}

template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float x) {
    bf16_t h;
#if __CUDA_ARCH__ >= 800
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
#else
    // Round to nearest even on the 16 dropped bits; NaN stays a (quiet) NaN.
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        h.bits = static_cast<unsigned short>((u >> 16) | 0x0040u);
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        h.bits = static_cast<unsigned short>(u >> 16);
    }
#endif
    return h;
}

// Instantiates `X(suffix, type)` once per floating storage type.
#define PAGODA_FOR_EACH_FLOAT(X) X(f32, float) X(f16, half_t) X(bf16, bf16_t)

// The value `x` becomes when stored as T: the rounding a kernel applies before it writes, for
// statistics that must describe what was stored.
template <typename T> __device__ __forceinline__ float round_to(float x) {
    return to_float(from_float<T>(x));
}

// ---------------------------------------------------------------------------------------------
// Vector access. `load_vec<V>` / `store_vec<V>` move V consecutive elements, as 128-bit
// transactions when V elements fill whole 16-byte words (V = 8 for every float type), else one
// element at a time. The 128-bit forms need 16-byte aligned pointers: callers check
// `is_aligned16` on every pointer (tensor views may start at any element) and fall back to V = 1.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ bool is_aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

template <int V, typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[V]) {
    if constexpr ((V * sizeof(T)) % 16 == 0) {
        constexpr int PER_WORD = 16 / sizeof(T);
#pragma unroll
        for (int w = 0; w < V / PER_WORD; ++w) {
            const uint4 raw = reinterpret_cast<const uint4*>(p)[w];
            const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
            for (int i = 0; i < PER_WORD; ++i) out[w * PER_WORD + i] = to_float(elems[i]);
        }
    } else {
#pragma unroll
        for (int i = 0; i < V; ++i) out[i] = to_float(p[i]);
    }
}

template <int V, typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[V]) {
    if constexpr ((V * sizeof(T)) % 16 == 0) {
        constexpr int PER_WORD = 16 / sizeof(T);
#pragma unroll
        for (int w = 0; w < V / PER_WORD; ++w) {
            uint4 raw;
            T* elems = reinterpret_cast<T*>(&raw);
#pragma unroll
            for (int i = 0; i < PER_WORD; ++i) elems[i] = from_float<T>(in[w * PER_WORD + i]);
            reinterpret_cast<uint4*>(p)[w] = raw;
        }
    } else {
#pragma unroll
        for (int i = 0; i < V; ++i) p[i] = from_float<T>(in[i]);
    }
}

// Elements per vector step: 8 elements are one 16-byte word of half/bf16 and two of float.
constexpr int VEC_WIDTH = 8;

// Pack<T>::N elements fill one 16-byte word; load_pack / store_pack move exactly one word.
template <typename T> struct Pack {
    static constexpr int N = 16 / sizeof(T);
};

template <typename T>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[Pack<T>::N]) {
    load_vec<Pack<T>::N>(p, out);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[Pack<T>::N]) {
    store_vec<Pack<T>::N>(p, in);
}

// ---------------------------------------------------------------------------------------------
// Overlapping launches (programmatic dependent launch, sm_90+; cuda/launch.rs). A kernel that the
// launcher may start while the kernel before it on the stream is still running calls
// wait_for_prior_kernels() before it reads anything an earlier kernel wrote and before it writes
// anything. A kernel that such a launch follows calls allow_dependent_launch() once its blocks no
// longer need the SM slots the next kernel's blocks would take: the next grid is scheduled when
// every block has made the call (or exited). Both are no-ops for ordinary launches.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void wait_for_prior_kernels() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependent_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// ---------------------------------------------------------------------------------------------
// Reductions. Block reductions need blockDim.x to be a multiple of 32 (at most 1024) and must be
// reached by every thread of the block; every thread receives the result.
// ---------------------------------------------------------------------------------------------

// -infinity, spelled without math.h (which NVRTC does not provide).
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    v = warp_sum(v);
    // Earlier reductions may still be reading `partial`.
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    return warp_sum(lane < warps ? partial[lane] : 0.0f);
}

__device__ __forceinline__ float block_max(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    return warp_max(lane < warps ? partial[lane] : NEG_INF);
}
