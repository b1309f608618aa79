// Embedding gather: out[t] = table[ids[t]], one block per token, copying the row as raw 16-byte
// words when the row size and both pointers allow it.
//
// The launcher cannot check ids on the host without a device-to-host copy, so the kernel
// guards the read instead: an id at or past `vocab` yields a row of zeros, never an
// out-of-bounds read. Callers validate ids where they come from (the tokenizer or sampler).

#include "common.cuh"

template <typename T>
__device__ void embedding(const T* __restrict__ table, const unsigned* __restrict__ ids, T* __restrict__ out,
                          unsigned vocab, unsigned hidden) {
    const unsigned id = ids[blockIdx.x];
    T* dst = out + static_cast<unsigned long long>(blockIdx.x) * hidden;
    if (id >= vocab) {
        for (unsigned i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = from_float<T>(0.0f);
        return;
    }
    const T* src = table + static_cast<unsigned long long>(id) * hidden;
    const unsigned long long bytes = static_cast<unsigned long long>(hidden) * sizeof(T);
    if (bytes % 16 == 0 && is_aligned16(src) && is_aligned16(dst)) {
        const uint4* from = reinterpret_cast<const uint4*>(src);
        uint4* to = reinterpret_cast<uint4*>(dst);
        for (unsigned long long w = threadIdx.x; w < bytes / 16; w += blockDim.x) to[w] = from[w];
    } else {
        for (unsigned i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = src[i];
    }
}

#define EMBEDDING_KERNEL(S, T)                                                                         \
    extern "C" __global__ void embedding_##S(const T* table, const unsigned* ids, T* out, unsigned vocab, \
                                             unsigned hidden) {                                        \
        embedding(table, ids, out, vocab, hidden);                                                     \
    }

PAGODA_FOR_EACH_FLOAT(EMBEDDING_KERNEL)
