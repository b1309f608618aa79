// Writing a batch's new keys and values into the paged KV cache (crates/pagoda-kernels/src/cpu/kv_write.rs):
// token t's K and V rows ([kv_heads, head_dim] each) go to slot slots[t] of the pages
// [num_blocks, block_size, kv_heads, head_dim], slot = block * block_size + offset.
//
// rope_write_kv rotates K (GPT-NeoX rotate half, as rope.cu) on its way into the page, so the model
// needs no separate RoPE pass over K: K is read once and written once; given Q, it rotates Q into
// a new buffer in the same launch.
//
// A slot at or past num_slots is skipped, so padded rows may carry 0xffffffff. A position outside
// the RoPE table writes NaN into the rotated dimensions of that token's K (see rope.cu).

#include "common.cuh"

namespace {

// Copies `len` elements, this thread taking `first`, `first + stride`, ...; 16 bytes at a time
// when both rows are aligned and whole packs.
template <typename T>
__device__ __forceinline__ void copy_row(const T* __restrict__ from, T* __restrict__ to, unsigned len,
                                         unsigned first, unsigned stride) {
    constexpr int N = Pack<T>::N;
    if (len % N == 0 && is_aligned16(from) && is_aligned16(to)) {
        const uint4* src = reinterpret_cast<const uint4*>(from);
        uint4* dst = reinterpret_cast<uint4*>(to);
        for (unsigned i = first; i < len / N; i += stride) dst[i] = src[i];
    } else {
        for (unsigned i = first; i < len; i += stride) to[i] = from[i];
    }
}

template <typename T>
__device__ void write_kv(const T* __restrict__ k, const T* __restrict__ v, const unsigned* __restrict__ slots,
                         T* __restrict__ k_pages, T* __restrict__ v_pages, unsigned tokens, unsigned token_len,
                         unsigned long long num_slots) {
    for (unsigned t = blockIdx.x; t < tokens; t += gridDim.x) {
        const unsigned long long slot = slots[t];
        if (slot >= num_slots) continue;
        const unsigned long long row = static_cast<unsigned long long>(t) * token_len;
        copy_row(k + row, k_pages + slot * token_len, token_len, threadIdx.x, blockDim.x);
        copy_row(v + row, v_pages + slot * token_len, token_len, threadIdx.x, blockDim.x);
    }
}

// Rotates `len` = heads x head_dim elements of one token (GPT-NeoX rotate half over the first
// rotary_dim dimensions of each head, the rest copied) from `from` into `to`, this thread taking
// elements `first`, `first + stride`, ...; NaN in the rotated dimensions when the position is
// outside the table.
template <typename T>
__device__ __forceinline__ void rotate_row(const T* __restrict__ from, T* __restrict__ to, unsigned len,
                                           unsigned first, unsigned stride, unsigned head_dim, unsigned rotary_dim,
                                           const float* __restrict__ cos_row, const float* __restrict__ sin_row,
                                           bool in_table) {
    const unsigned half = rotary_dim / 2;
    for (unsigned e = first; e < len; e += stride) {
        const unsigned d = e % head_dim;
        if (d >= rotary_dim) {
            to[e] = from[e];
            continue;
        }
        float rotated = __int_as_float(0x7fc00000);
        if (in_table) {
            // The pair (a, b) = (dimension i, dimension i + half) of this head.
            const unsigned i = d < half ? d : d - half;
            const unsigned head_start = e - d;
            const float a = to_float(from[head_start + i]);
            const float b = to_float(from[head_start + i + half]);
            const float c = cos_row[i];
            const float s = sin_row[i];
            rotated = d < half ? a * c - b * s : b * c + a * s;
        }
        to[e] = from_float<T>(rotated);
    }
}

// With q non-null, also writes q rotated the same way to q_out (q_heads heads per token): the
// query's RoPE rides along in the same launch. The grid's y dimension splits each token's rows
// among several blocks: a decode step has one token, and one block walking its rows would
// chain a dozen dependent memory round trips per thread.
template <typename T>
__device__ void rope_write_kv(const T* __restrict__ q, T* __restrict__ q_out, unsigned q_heads,
                              const T* __restrict__ k, const T* __restrict__ v, const unsigned* __restrict__ positions,
                              const unsigned* __restrict__ slots, const float* __restrict__ cos,
                              const float* __restrict__ sin, T* __restrict__ k_pages, T* __restrict__ v_pages,
                              unsigned tokens, unsigned kv_heads, unsigned head_dim, unsigned rotary_dim,
                              unsigned max_positions, unsigned long long num_slots) {
    const unsigned half = rotary_dim / 2;
    const unsigned token_len = kv_heads * head_dim;
    const unsigned first = blockIdx.y * blockDim.x + threadIdx.x;
    const unsigned stride = gridDim.y * blockDim.x;
    for (unsigned t = blockIdx.x; t < tokens; t += gridDim.x) {
        const unsigned position = positions[t];
        const bool in_table = position < max_positions;
        const float* cos_row = cos + static_cast<unsigned long long>(position) * half;
        const float* sin_row = sin + static_cast<unsigned long long>(position) * half;
        if (q != nullptr) {
            const unsigned long long q_row = static_cast<unsigned long long>(t) * q_heads * head_dim;
            rotate_row(q + q_row, q_out + q_row, q_heads * head_dim, first, stride, head_dim, rotary_dim, cos_row,
                       sin_row, in_table);
        }
        const unsigned long long slot = slots[t];
        if (slot >= num_slots) continue;
        const unsigned long long row = static_cast<unsigned long long>(t) * token_len;
        rotate_row(k + row, k_pages + slot * token_len, token_len, first, stride, head_dim, rotary_dim, cos_row,
                   sin_row, in_table);
        copy_row(v + row, v_pages + slot * token_len, token_len, first, stride);
    }
}

}  // namespace

// k, v [tokens, kv_heads, head_dim]; slots, positions [tokens] (u32); pages [num_slots, kv_heads,
// head_dim]; cos, sin [max_positions, rotary_dim / 2] (f32). Grid x over tokens (grid-stride);
// write_kv has one block per token, rope_write_kv splits each token's rows over grid y.
#define PAGODA_KV_WRITE_KERNELS(SUFFIX, T)                                                                         \
    extern "C" __global__ void write_kv_##SUFFIX(const T* __restrict__ k, const T* __restrict__ v,                  \
                                                 const unsigned* __restrict__ slots, T* __restrict__ k_pages,       \
                                                 T* __restrict__ v_pages, unsigned tokens, unsigned token_len,      \
                                                 unsigned long long num_slots) {                                    \
        write_kv<T>(k, v, slots, k_pages, v_pages, tokens, token_len, num_slots);                                  \
    }                                                                                                              \
    /* q: null, or [tokens, q_heads, head_dim] rotated into q_out. */                                           \
    extern "C" __global__ void rope_write_kv_##SUFFIX(                                                             \
        const T* __restrict__ q, T* __restrict__ q_out, unsigned q_heads,                                          \
        const T* __restrict__ k, const T* __restrict__ v, const unsigned* __restrict__ positions,                  \
        const unsigned* __restrict__ slots, const float* __restrict__ cos, const float* __restrict__ sin,          \
        T* __restrict__ k_pages, T* __restrict__ v_pages, unsigned tokens, unsigned kv_heads, unsigned head_dim,   \
        unsigned rotary_dim, unsigned max_positions, unsigned long long num_slots) {                               \
        rope_write_kv<T>(q, q_out, q_heads, k, v, positions, slots, cos, sin, k_pages, v_pages, tokens, kv_heads,   \
                         head_dim, rotary_dim, max_positions, num_slots);                                          \
    }

PAGODA_FOR_EACH_FLOAT(PAGODA_KV_WRITE_KERNELS)
