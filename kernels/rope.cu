// Rotary position embedding, GPT-NeoX "rotate half" layout (crates/pagoda-kernels/src/cpu/rope.rs):
// in each head, dimension i < rotary_dim / 2 is paired with i + rotary_dim / 2 and the pair
// (a, b) becomes (a cos - b sin, b cos + a sin) with the angles of the token's position; the
// dimensions from rotary_dim on are left as they are. cos and sin come from a precomputed f32
// table [max_positions, rotary_dim / 2].
//
// A position outside the table cannot be reported from here; the token's rotated dimensions are
// set to NaN instead, so the mistake shows in the output rather than passing for a rotation.

#include "common.cuh"

namespace {

template <typename T>
__device__ void apply_rope(T* __restrict__ x, const unsigned* __restrict__ positions, const float* __restrict__ cos,
                           const float* __restrict__ sin, unsigned tokens, unsigned heads, unsigned head_dim,
                           unsigned rotary_dim, unsigned max_positions) {
    const unsigned half = rotary_dim / 2;
    const unsigned pairs = heads * half;
    for (unsigned t = blockIdx.x; t < tokens; t += gridDim.x) {
        const unsigned position = positions[t];
        const bool in_table = position < max_positions;
        const float* cos_row = cos + static_cast<unsigned long long>(position) * half;
        const float* sin_row = sin + static_cast<unsigned long long>(position) * half;
        T* token = x + static_cast<unsigned long long>(t) * heads * head_dim;
        for (unsigned p = threadIdx.x; p < pairs; p += blockDim.x) {
            const unsigned head = p / half;
            const unsigned i = p % half;
            T* first = token + head * head_dim + i;
            T* second = first + half;
            float rotated_first = __int_as_float(0x7fc00000);
            float rotated_second = rotated_first;
            if (in_table) {
                const float a = to_float(*first);
                const float b = to_float(*second);
                const float c = cos_row[i];
                const float s = sin_row[i];
                rotated_first = a * c - b * s;
                rotated_second = b * c + a * s;
            }
            *first = from_float<T>(rotated_first);
            *second = from_float<T>(rotated_second);
        }
    }
}

}  // namespace

// x [tokens, heads, head_dim] rotated in place; positions [tokens] (u32); cos, sin [max_positions,
// rotary_dim / 2] (f32). One block per token (grid-stride), threads over (head, pair).
#define PAGODA_ROPE_KERNELS(SUFFIX, T)                                                                       \
    extern "C" __global__ void apply_rope_##SUFFIX(T* __restrict__ x, const unsigned* __restrict__ positions, \
                                                   const float* __restrict__ cos, const float* __restrict__ sin, \
                                                   unsigned tokens, unsigned heads, unsigned head_dim,          \
                                                   unsigned rotary_dim, unsigned max_positions) {               \
        apply_rope<T>(x, positions, cos, sin, tokens, heads, head_dim, rotary_dim, max_positions);           \
    }

PAGODA_FOR_EACH_FLOAT(PAGODA_ROPE_KERNELS)
