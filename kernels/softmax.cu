// Row-wise softmax: y[r, :] = exp(x[r, :] - max) / sum(exp(x[r, :] - max)), f32 math for every dtype.
//
// Four forms, chosen by the launcher (crates/pagoda-kernels/src/cuda/softmax.rs) from the row length:
// - softmax_c1_e{8,16,32,64}: one thread block per row, the row held in registers (E values per
//   thread, as loaded): one read and one write of the row.
// - softmax_c{2,4,8}_e{8,16,32,64} (sm_90+): a thread block cluster per row, each block holding a
//   segment in registers; the blocks exchange their max and sum through distributed shared memory,
//   so rows too long for one block still cost one read and one write.
// - softmax_online: longer rows. A running (max, sum) per thread, merged across the block, then a
//   second pass that re-reads the row (back to front, so the most recently read part is still in
//   L2) and writes it.
// - softmax_streamed_c{1,2,4,8} (sm_90+): rows of whole 16-byte words, 16-byte aligned. A
//   persistent grid of clusters whose blocks keep several rows' segments in shared memory, filled
//   by bulk copies rows ahead, so the loads of the next rows overlap the reduction and the stores
//   of this one, which the held forms do in step; one read and one write of the row, as there.
//
// A row whose maximum is -inf (all -inf) or that holds NaN or +inf comes out as NaN, as on the CPU.

#include "common.cuh"

namespace {

constexpr int MAX_THREADS = 1024;

// Loads the 16-byte vector at element `base` of a row, or element by element (padding with -inf past
// `end`) where the vector is not fully inside the row or the row is not 16-byte aligned.
template <typename T, int N>
__device__ __forceinline__ void load_or_pad(const T* __restrict__ row, long long base, long long end,
                                            bool aligned, float (&out)[N]) {
    if (aligned && base + N <= end) {
        load_pack<T>(row + base, out);
    } else {
#pragma unroll
        for (int e = 0; e < N; ++e) {
            out[e] = base + e < end ? to_float(row[base + e]) : NEG_INF;
        }
    }
}

template <typename T, int N>
__device__ __forceinline__ void store_or_clip(T* __restrict__ row, long long base, long long end,
                                              bool aligned, const float (&in)[N]) {
    if (aligned && base + N <= end) {
        store_pack<T>(row + base, in);
    } else {
#pragma unroll
        for (int e = 0; e < N; ++e) {
            if (base + e < end) {
                row[base + e] = from_float<T>(in[e]);
            }
        }
    }
}

__device__ __forceinline__ bool both_aligned16(const void* a, const void* b) {
    return ((reinterpret_cast<unsigned long long>(a) | reinterpret_cast<unsigned long long>(b)) & 15) == 0;
}

// exp(x - max) where an x of -inf contributes exactly 0 even when max is -inf too (a thread or block
// whose values are all -inf, or padding), while NaN (and +inf against a max of +inf) still poison
// the sum, as on the CPU.
__device__ __forceinline__ float exp_shifted(float x, float max) {
    return x == NEG_INF ? 0.0f : expf(x - max);
}

// exp(x - max) as 2^(x log2(e) - max log2(e)): one FFMA and one MUFU.EX2 where expf takes about
// eight instructions, which the held forms, short of neither bandwidth nor registers, feel.
// `shift` is max * log2(e), rounded once per row: its rounding scales every value of the row
// alike and cancels in the division by the sum. The FFMA rounds once, at the result, whose
// magnitude is |x - max| log2(e); ex2.approx is accurate to 2 ulp and flushes results below
// 2^-126 to zero. -inf gives 0; a max of -inf (an all -inf row) or +inf gives NaN, as expf does.
__device__ __forceinline__ float exp_from_max(float x, float shift) {
    constexpr float LOG2E = 1.4426950408889634f;
    float out;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(out) : "f"(fmaf(x, LOG2E, -shift)));
    return out;
}

// Merges a running (max, sum of exp(x - max)) with another: both sums are rescaled to the larger max.
// Commutative, so every lane of a butterfly reduction ends with the same result.
__device__ __forceinline__ void merge_online(float& max, float& sum, float other_max, float other_sum) {
    const float m = fmaxf(max, other_max);
    sum = sum * exp_shifted(max, m) + other_sum * exp_shifted(other_max, m);
    max = m;
}

__device__ __forceinline__ void warp_merge(float& max, float& sum) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float other_max = __shfl_xor_sync(0xffffffffu, max, offset);
        const float other_sum = __shfl_xor_sync(0xffffffffu, sum, offset);
        merge_online(max, sum, other_max, other_sum);
    }
}

// The (max, sum) of the whole block, in every thread: one exchange through shared memory.
__device__ __forceinline__ void block_merge(float& max, float& sum) {
    __shared__ float maxes[32];
    __shared__ float sums[32];
    const unsigned lane = threadIdx.x & 31;
    const unsigned warp = threadIdx.x >> 5;
    const unsigned warps = blockDim.x >> 5;
    warp_merge(max, sum);
    __syncthreads();  // an earlier merge may still be reading the arrays
    if (lane == 0) {
        maxes[warp] = max;
        sums[warp] = sum;
    }
    __syncthreads();
    max = lane < warps ? maxes[lane] : NEG_INF;
    sum = lane < warps ? sums[lane] : 0.0f;
    warp_merge(max, sum);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// Thread block cluster primitives (PTX ISA 7.8, sm_90): the rank of this block in its cluster, a
// barrier over the whole cluster that orders shared-memory writes before it against reads after it,
// and a read of another block's shared memory.
__device__ __forceinline__ unsigned cluster_rank() {
    unsigned rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    return rank;
}

__device__ __forceinline__ void cluster_barrier() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

__device__ __forceinline__ float load_from_cluster_block(const float* local, unsigned rank) {
    unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(local));
    unsigned remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(address), "r"(rank));
    float value;
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(value) : "r"(remote) : "memory");
    return value;
}
#endif

// One 16-byte word of a row, loaded as is, or element by element (padding with -inf past `end`)
// where the word is not fully inside the row or the row is not 16-byte aligned.
template <typename T>
__device__ __forceinline__ uint4 load_word_or_pad(const T* __restrict__ row, long long base, long long end,
                                                  bool aligned) {
    constexpr int V = Pack<T>::N;
    if (aligned && base + V <= end) {
        return *reinterpret_cast<const uint4*>(row + base);
    }
    uint4 word;
    T* elements = reinterpret_cast<T*>(&word);
#pragma unroll
    for (int e = 0; e < V; ++e) {
        elements[e] = base + e < end ? row[base + e] : from_float<T>(NEG_INF);
    }
    return word;
}

// Rewrites each 16-bit pair of the words with an exact multiply by one. ptxas cannot fold it, so
// the next pass converts the words to f32 again instead of keeping the previous pass's floats
// alive: those are twice the registers of the words and spilled at 64 values per thread.
template <typename T>
__device__ __forceinline__ unsigned refresh_pair(unsigned pair);

template <>
__device__ __forceinline__ unsigned refresh_pair<half_t>(unsigned pair) {
    unsigned out;
    asm volatile("mul.rn.f16x2 %0, %1, %2;" : "=r"(out) : "r"(pair), "r"(0x3C003C00u));
    return out;
}

template <>
__device__ __forceinline__ unsigned refresh_pair<bf16_t>(unsigned pair) {
    unsigned out;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mul.rn.bf16x2 %0, %1, %2;" : "=r"(out) : "r"(pair), "r"(0x3F803F80u));
#else
    // No bf16 multiply before sm_90: x * 1 + (-0) is x for every x, -0 included.
    asm volatile("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(out) : "r"(pair), "r"(0x3F803F80u), "r"(0x80008000u));
#endif
    return out;
}

template <typename T, int WORDS>
__device__ __forceinline__ void refresh_words(uint4 (&words)[WORDS]) {
    if constexpr (sizeof(T) == 2) {
#pragma unroll
        for (int j = 0; j < WORDS; ++j) {
            words[j].x = refresh_pair<T>(words[j].x);
            words[j].y = refresh_pair<T>(words[j].y);
            words[j].z = refresh_pair<T>(words[j].z);
            words[j].w = refresh_pair<T>(words[j].w);
        }
    }
}

template <typename T>
__device__ __forceinline__ void unpack_word(const uint4& word, float (&out)[Pack<T>::N]) {
    const T* elements = reinterpret_cast<const T*>(&word);
#pragma unroll
    for (int e = 0; e < Pack<T>::N; ++e) {
        out[e] = to_float(elements[e]);
    }
}

// A bf16 pair is two floats' upper halves: one shift and one mask per pair, straight from the
// 32-bit word. Reading the 16-bit elements through a pointer, as above, costs an extract each, and
// at 64 values per thread the extra registers spilled 150-250 bytes a thread (50 now).
template <>
__device__ __forceinline__ void unpack_word<bf16_t>(const uint4& word, float (&out)[8]) {
    const unsigned pairs[4] = {word.x, word.y, word.z, word.w};
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        out[2 * p] = __uint_as_float(pairs[p] << 16);
        out[2 * p + 1] = __uint_as_float(pairs[p] & 0xffff0000u);
    }
}

// Softmax of rows held in registers: CLUSTER blocks per row, each holding `segment` columns (a
// multiple of the 16-byte vector width, so every segment starts aligned when the row does) as
// E values per thread. Word j of thread t is word j * blockDim.x + t of the segment, so each load
// instruction of a warp covers 512 contiguous bytes.
//
// The values stay in registers as loaded, not as f32: a 16-bit row then takes half the registers,
// so twice as many blocks share a multiprocessor and one block's loads overlap another's
// reductions and stores. The price is converting and exponentiating each value twice (for the
// sum and for the output), which is arithmetic the memory-bound kernel has to spare.
template <typename T, int E, int CLUSTER>
__device__ __forceinline__ void softmax_in_registers(const T* __restrict__ x, T* __restrict__ y,
                                                     unsigned long long rows, long long cols,
                                                     long long segment) {
    constexpr int V = Pack<T>::N;
    static_assert(E % V == 0, "elements per thread must be whole 16-byte words");
    constexpr int WORDS = E / V;
    unsigned rank = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    __shared__ float cluster_max;
    __shared__ float cluster_sum;
    if (CLUSTER > 1) {
        rank = cluster_rank();
    }
#endif
    const long long start = segment * rank;
    const long long end = min(cols, start + segment);
    for (unsigned long long r = blockIdx.x / CLUSTER; r < rows; r += gridDim.x / CLUSTER) {
        const T* x_row = x + r * cols;
        T* y_row = y + r * cols;
        const bool aligned = both_aligned16(x_row, y_row);

        uint4 words[WORDS];
#pragma unroll
        for (int j = 0; j < WORDS; ++j) {
            const long long base = start + (static_cast<long long>(j) * blockDim.x + threadIdx.x) * V;
            words[j] = load_word_or_pad<T>(x_row, base, end, aligned);
        }

        float max = NEG_INF;
#pragma unroll
        for (int j = 0; j < WORDS; ++j) {
            float v[V];
            unpack_word<T>(words[j], v);
#pragma unroll
            for (int e = 0; e < V; ++e) {
                max = fmaxf(max, v[e]);
            }
        }
        refresh_words<T>(words);
        max = block_max(max);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        if (CLUSTER > 1) {
            if (threadIdx.x == 0) {
                cluster_max = max;
            }
            cluster_barrier();
#pragma unroll
            for (unsigned b = 0; b < CLUSTER; ++b) {
                max = fmaxf(max, load_from_cluster_block(&cluster_max, b));
            }
        }
#endif

        const float shift = max * 1.4426950408889634f;
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < WORDS; ++j) {
            float v[V];
            unpack_word<T>(words[j], v);
#pragma unroll
            for (int e = 0; e < V; ++e) {
                sum += exp_from_max(v[e], shift);
            }
        }
        refresh_words<T>(words);
        sum = block_sum(sum);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        if (CLUSTER > 1) {
            if (threadIdx.x == 0) {
                cluster_sum = sum;
            }
            cluster_barrier();
            sum = 0.0f;
#pragma unroll
            for (unsigned b = 0; b < CLUSTER; ++b) {
                sum += load_from_cluster_block(&cluster_sum, b);
            }
        }
#endif

        const float inv_sum = 1.0f / sum;
#pragma unroll
        for (int j = 0; j < WORDS; ++j) {
            float v[V];
            unpack_word<T>(words[j], v);
#pragma unroll
            for (int e = 0; e < V; ++e) {
                v[e] = exp_from_max(v[e], shift) * inv_sum;
            }
            const long long base = start + (static_cast<long long>(j) * blockDim.x + threadIdx.x) * V;
            store_or_clip<T, V>(y_row, base, end, aligned, v);
        }
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (CLUSTER > 1) {
        // No block may exit while another still reads its shared memory.
        cluster_barrier();
    }
#endif
}

// Vectors each thread loads before using any, in the online form: enough bytes in flight per
// multiprocessor to cover memory latency with one block of 1024 threads per row.
constexpr int UNROLL = 4;

template <typename T>
__device__ __forceinline__ void softmax_online(const T* __restrict__ x, T* __restrict__ y, unsigned long long rows,
                                               long long cols) {
    constexpr int V = Pack<T>::N;
    const long long vectors = (cols + V - 1) / V;
    const long long stride = blockDim.x;
    const long long group = UNROLL * stride;
    for (unsigned long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* x_row = x + r * cols;
        T* y_row = y + r * cols;
        const bool aligned = both_aligned16(x_row, y_row);

        // Pass 1: a running (max, sum) per thread over its vectors, UNROLL loads at a time.
        float max = NEG_INF;
        float sum = 0.0f;
        for (long long first = threadIdx.x; first < vectors; first += group) {
            float v[UNROLL][V];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                load_or_pad<T, V>(x_row, (first + u * stride) * V, cols, aligned, v[u]);
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                float vector_max = NEG_INF;
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    vector_max = fmaxf(vector_max, v[u][e]);
                }
                float vector_sum = 0.0f;
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    vector_sum += exp_shifted(v[u][e], vector_max);
                }
                merge_online(max, sum, vector_max, vector_sum);
            }
        }
        block_merge(max, sum);

        // Pass 2, back to front: the end of the row was read last and is the part most likely
        // still in L2.
        const float inv_sum = 1.0f / sum;
        if (static_cast<long long>(threadIdx.x) < vectors) {
            const long long last = threadIdx.x + (vectors - 1 - threadIdx.x) / group * group;
            for (long long first = last; first >= 0; first -= group) {
                float v[UNROLL][V];
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) {
                    load_or_pad<T, V>(x_row, (first + u * stride) * V, cols, aligned, v[u]);
                }
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
                    for (int e = 0; e < V; ++e) {
                        v[u][e] = exp_shifted(v[u][e], max) * inv_sum;
                    }
                    store_or_clip<T, V>(y_row, (first + u * stride) * V, cols, aligned, v[u]);
                }
            }
        }
    }
}


#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// Stage buffers one block of the streamed form may keep (the launcher asks for at most this many).
constexpr unsigned MAX_STAGES = 8;

// mbarrier and bulk-copy primitives (PTX ISA 8.0, sm_90): a barrier that completes when its one
// arrival and the bytes it was told to expect have both come in, and a copy of global memory into
// this block's shared memory by the copy engine (TMA), which reports its bytes to such a barrier.
__device__ __forceinline__ unsigned shared_address(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbarrier_init(unsigned barrier) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(barrier) : "memory");
}

// `bytes` (a multiple of 16, as are both addresses) from `source` into `destination`, completing
// the current phase of `barrier`; an empty segment only arrives.
__device__ __forceinline__ void bulk_load(unsigned destination, const void* source, unsigned bytes,
                                          unsigned barrier) {
    if (bytes == 0) {
        asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(barrier) : "memory");
        return;
    }
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(barrier), "r"(bytes) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :
                 : "r"(destination), "l"(source), "r"(bytes), "r"(barrier)
                 : "memory");
}

// Returns once the phase of `barrier` with this parity has completed (the copy's bytes are visible).
__device__ __forceinline__ void mbarrier_wait(unsigned barrier, unsigned parity) {
    unsigned done;
    do {
        asm volatile(
            "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
            : "=r"(done)
            : "r"(barrier), "r"(parity)
            : "memory");
    } while (!done);
}

__device__ __forceinline__ float2 load_pair_from_cluster_block(const float2* local, unsigned rank) {
    unsigned remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(shared_address(local)), "r"(rank));
    float2 value;
    asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];" : "=f"(value.x), "=f"(value.y) : "r"(remote) : "memory");
    return value;
}

__device__ __forceinline__ float ex2(float x) {
    float out;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(out) : "f"(x));
    return out;
}

// max * log2(e) as the sum and output passes subtract it. A block whose values are all -inf or NaN
// has a max of -inf (fmaxf skips NaN); 0 then makes its -inf values contribute exactly 0 and keeps
// its NaN, where -inf would turn every value into NaN, also in rows that only a mask covers.
__device__ __forceinline__ float block_shift(float max) {
    return max == NEG_INF ? 0.0f : __fmul_rn(max, 1.4426950408889634f);
}

// Softmax of rows streamed through shared memory: a persistent grid of clusters of CLUSTER blocks,
// cluster k taking rows k, k + clusters, ...; block b always holds columns [b segment, (b + 1)
// segment) of its rows. The held forms load, reduce and store a wave of rows in step, so while a
// wave reduces nothing is read, and rows of 128256 columns fill the registers of the chip about
// four times over: four such stalls per call. Here the copy engine fills `stages` buffers per
// block, rows ahead of the one being reduced and stored, so DRAM keeps reading under the reduction
// and the stores.
//
// One exchange per row: each block reduces its segment against its own max, and the cluster
// rescales the C (max, sum) pairs to the row's max. The rescaling adds one rounding per block, not
// per thread (the per-thread version of this lost 1.2e-5 in f32). The weights use the very shifts
// the sums were taken against, so their rounding cancels as the per-row shift's does.
//
// Needs x and y 16-byte aligned and rows a whole number of 16-byte words (the bulk copy's rule),
// and every block of a cluster to iterate the same rows: they share the row loop, so each reaches
// every cluster barrier equally often.
template <typename T, int CLUSTER>
__device__ __forceinline__ void softmax_streamed(const T* __restrict__ x, T* __restrict__ y,
                                                 unsigned long long rows, long long cols, long long segment,
                                                 unsigned stages) {
    constexpr int V = Pack<T>::N;
    extern __shared__ __align__(128) uint4 buffers[];  // stages x segment elements
    __shared__ __align__(8) unsigned long long full[MAX_STAGES];
    // Double-buffered by row parity: a block writes a slot again only two rows later, after the
    // next row's cluster barrier, which every peer reaches only once done reading it.
    __shared__ float2 exchange[2];

    const unsigned rank = CLUSTER > 1 ? cluster_rank() : 0;
    const long long start = segment * rank;
    const long long held = max(0LL, min(cols, start + segment) - start);
    const unsigned words = static_cast<unsigned>(held / V);
    const unsigned bytes = static_cast<unsigned>(held * static_cast<long long>(sizeof(T)));
    const unsigned stage_words = static_cast<unsigned>(segment / V);
    const unsigned long long cluster = blockIdx.x / CLUSTER;
    const unsigned long long clusters = gridDim.x / CLUSTER;
    const unsigned long long count = cluster < rows ? (rows - 1 - cluster) / clusters + 1 : 0;
    const unsigned long long ahead = min(static_cast<unsigned long long>(stages), count);

    // Row i of this cluster goes to stage i % stages, phase i / stages of that stage's barrier.
    auto load_row = [&](unsigned long long i, unsigned stage) {
        const T* source = x + (cluster + i * clusters) * cols + start;
        bulk_load(shared_address(buffers + stage * stage_words), source, bytes, shared_address(&full[stage]));
    };

    if (threadIdx.x == 0) {
        for (unsigned s = 0; s < stages; ++s) {
            mbarrier_init(shared_address(&full[s]));
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (unsigned long long i = 0; i < ahead; ++i) {
            load_row(i, static_cast<unsigned>(i));
        }
    }

    const unsigned lane = threadIdx.x & 31;
    unsigned stage = 0;
    unsigned parity = 0;
    for (unsigned long long i = 0; i < count; ++i) {
        mbarrier_wait(shared_address(&full[stage]), parity);
        const uint4* segment_words = buffers + stage * stage_words;

        // This thread's words of the stage, each value folded into `acc` by `fold`.
        auto fold_values = [&](float acc, auto fold) {
#pragma unroll 4
            for (unsigned w = threadIdx.x; w < words; w += blockDim.x) {
                float v[V];
                unpack_word<T>(segment_words[w], v);
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    acc = fold(acc, v[e]);
                }
            }
            return acc;
        };
        const float max = block_max(fold_values(NEG_INF, [](float m, float v) { return fmaxf(m, v); }));
        const float own_shift = block_shift(max);
        const float sum = block_sum(
            fold_values(0.0f, [own_shift](float s, float v) { return s + exp_from_max(v, own_shift); }));

        // Lane c of every warp takes block c's pair; the other lanes add nothing.
        float2 pair = make_float2(NEG_INF, 0.0f);
        if constexpr (CLUSTER > 1) {
            if (threadIdx.x == 0) {
                exchange[i & 1] = make_float2(max, sum);
            }
            cluster_barrier();
            if (lane < CLUSTER) {
                pair = load_pair_from_cluster_block(&exchange[i & 1], lane);
            }
        } else if (lane == 0) {
            pair = make_float2(max, sum);
        }
        const float row_max = warp_max(pair.x);
        const float shift = __fmul_rn(row_max, 1.4426950408889634f);
        // A block of -inf and NaN keeps its NaN through the zero weight (NaN * 0); an all -inf row
        // has a shift of -inf, so every output is NaN, as in the held forms.
        const float weight = pair.x == NEG_INF ? 0.0f : ex2(__fsub_rn(block_shift(pair.x), shift));
        const float inv_sum = 1.0f / warp_sum(pair.y * weight);

        T* y_row = y + (cluster + i * clusters) * cols + start;
#pragma unroll 4
        for (unsigned w = threadIdx.x; w < words; w += blockDim.x) {
            float v[V];
            unpack_word<T>(segment_words[w], v);
#pragma unroll
            for (int e = 0; e < V; ++e) {
                v[e] = exp_from_max(v[e], shift) * inv_sum;
            }
            store_pack<T>(y_row + static_cast<long long>(w) * V, v);
        }

        // Every thread's reads of the stage are done before the copy engine overwrites it.
        __syncthreads();
        if (threadIdx.x == 0 && i + stages < count) {
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            load_row(i + stages, stage);
        }
        if (++stage == stages) {
            stage = 0;
            parity ^= 1;
        }
    }
    if constexpr (CLUSTER > 1) {
        // No block may exit while another still reads its exchange slot.
        cluster_barrier();
    }
}
#endif

}  // namespace

// Arguments of every kernel: x and y [rows, cols] (contiguous, distinct), rows, cols, and for the
// register forms the columns each block of a row holds (`segment`, a multiple of 16 / sizeof(T)).
// The register forms are named softmax_c{blocks per row}_e{values per thread}.
#define PAGODA_SOFTMAX_HELD(T, SUFFIX, CLUSTER, E, ATTRIBUTES)                                              \
    extern "C" __global__ void ATTRIBUTES __launch_bounds__(MAX_THREADS)                                     \
        softmax_c##CLUSTER##_e##E##_##SUFFIX(const T* __restrict__ x, T* __restrict__ y,                    \
                                             unsigned long long rows, long long cols, long long segment) { \
        softmax_in_registers<T, E, CLUSTER>(x, y, rows, cols, segment);                                     \
    }

#define PAGODA_SOFTMAX_NO_CLUSTER
#define PAGODA_SOFTMAX_CLUSTER(CLUSTER) __cluster_dims__(CLUSTER, 1, 1)

#define PAGODA_SOFTMAX_KERNELS(T, SUFFIX)                                                                     \
    PAGODA_SOFTMAX_HELD(T, SUFFIX, 1, 8, PAGODA_SOFTMAX_NO_CLUSTER)                                           \
    PAGODA_SOFTMAX_HELD(T, SUFFIX, 1, 16, PAGODA_SOFTMAX_NO_CLUSTER)                                          \
    PAGODA_SOFTMAX_HELD(T, SUFFIX, 1, 32, PAGODA_SOFTMAX_NO_CLUSTER)                                          \
    PAGODA_SOFTMAX_HELD(T, SUFFIX, 1, 64, PAGODA_SOFTMAX_NO_CLUSTER)                                          \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS)                                                 \
        softmax_online_##SUFFIX(const T* __restrict__ x, T* __restrict__ y, unsigned long long rows,          \
                                long long cols) {                                                             \
        softmax_online<T>(x, y, rows, cols);                                                                  \
    }

#define PAGODA_SOFTMAX_CLUSTER_KERNELS(T, SUFFIX, CLUSTER)                                                    \
    PAGODA_SOFTMAX_HELD(T, SUFFIX, CLUSTER, 8, PAGODA_SOFTMAX_CLUSTER(CLUSTER))                               \
    PAGODA_SOFTMAX_HELD(T, SUFFIX, CLUSTER, 16, PAGODA_SOFTMAX_CLUSTER(CLUSTER))                              \
    PAGODA_SOFTMAX_HELD(T, SUFFIX, CLUSTER, 32, PAGODA_SOFTMAX_CLUSTER(CLUSTER))                              \
    PAGODA_SOFTMAX_HELD(T, SUFFIX, CLUSTER, 64, PAGODA_SOFTMAX_CLUSTER(CLUSTER))

PAGODA_SOFTMAX_KERNELS(float, f32)
PAGODA_SOFTMAX_KERNELS(half_t, f16)
PAGODA_SOFTMAX_KERNELS(bf16_t, bf16)

// The streamed form: softmax_streamed_c{blocks per row}, taking (x, y, rows, cols, segment,
// stages) and stages x segment elements of dynamic shared memory.
#define PAGODA_SOFTMAX_STREAMED(T, SUFFIX, CLUSTER, ATTRIBUTES)                                             \
    extern "C" __global__ void ATTRIBUTES __launch_bounds__(MAX_THREADS)                                     \
        softmax_streamed_c##CLUSTER##_##SUFFIX(const T* __restrict__ x, T* __restrict__ y,                  \
                                               unsigned long long rows, long long cols, long long segment, \
                                               unsigned stages) {                                           \
        softmax_streamed<T, CLUSTER>(x, y, rows, cols, segment, stages);                                    \
    }

#define PAGODA_SOFTMAX_STREAMED_KERNELS(T, SUFFIX)                                                            \
    PAGODA_SOFTMAX_STREAMED(T, SUFFIX, 1, PAGODA_SOFTMAX_NO_CLUSTER)                                          \
    PAGODA_SOFTMAX_STREAMED(T, SUFFIX, 2, PAGODA_SOFTMAX_CLUSTER(2))                                          \
    PAGODA_SOFTMAX_STREAMED(T, SUFFIX, 4, PAGODA_SOFTMAX_CLUSTER(4))                                          \
    PAGODA_SOFTMAX_STREAMED(T, SUFFIX, 8, PAGODA_SOFTMAX_CLUSTER(8))

// Clusters and bulk copies exist from sm_90 on; the launcher asks for these kernels only there.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
PAGODA_SOFTMAX_STREAMED_KERNELS(float, f32)
PAGODA_SOFTMAX_STREAMED_KERNELS(half_t, f16)
PAGODA_SOFTMAX_STREAMED_KERNELS(bf16_t, bf16)
PAGODA_SOFTMAX_CLUSTER_KERNELS(float, f32, 2)
PAGODA_SOFTMAX_CLUSTER_KERNELS(float, f32, 4)
PAGODA_SOFTMAX_CLUSTER_KERNELS(float, f32, 8)
PAGODA_SOFTMAX_CLUSTER_KERNELS(half_t, f16, 2)
PAGODA_SOFTMAX_CLUSTER_KERNELS(half_t, f16, 4)
PAGODA_SOFTMAX_CLUSTER_KERNELS(half_t, f16, 8)
PAGODA_SOFTMAX_CLUSTER_KERNELS(bf16_t, bf16, 2)
PAGODA_SOFTMAX_CLUSTER_KERNELS(bf16_t, bf16, 4)
PAGODA_SOFTMAX_CLUSTER_KERNELS(bf16_t, bf16, 8)
#endif
