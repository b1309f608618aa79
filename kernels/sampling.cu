// Choosing tokens on the GPU: argmax per row, and sampling with temperature, top-k, top-p and min-p
// from one uniform number per row, with the semantics of the CPU sampler
// (crates/pagoda-kernels/src/cpu/sampling.rs): the filters run in that order, each on the
// distribution the previous one left, probabilities are f64, and tokens are ordered by descending
// logit, then ascending id.
//
// One thread block per row. Instead of sorting the vocabulary, every filter is a threshold on a
// 64-bit sort key (the logit's order-preserving bits, then the inverted token id, so that keys are
// unique and descending key order is the CPU's order), found by a radix search: 8 bits per pass,
// histogramming the weight (a count, or a probability mass) of the elements whose key matches the
// bits decided so far, then picking the bin where the running total from the top crosses the target.
// The search stops as soon as one element is left in the chosen bin, so it usually takes 2-3 passes
// over the row (read from L2) rather than 8.
//
// A row without a number (all NaN), or, when sampling, whose largest logit is -inf, yields NO_TOKEN.

#include "common.cuh"

namespace {

constexpr unsigned NO_TOKEN = 0xffffffffu;
constexpr int BINS = 256;

#define POS_INF __int_as_float(0x7f800000)

__device__ __forceinline__ bool is_nan(float x) { return x != x; }

// The bits of `x` as an unsigned integer with the same order as the floats (NaN excluded); -0 and +0
// compare equal on the CPU, so both map to the key of +0.
__device__ __forceinline__ unsigned ordered_bits(float x) {
    const unsigned u = __float_as_uint(x == 0.0f ? 0.0f : x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Larger key = earlier in the CPU's order (descending logit, then ascending id).
__device__ __forceinline__ unsigned long long sort_key(float logit, long long index) {
    return (static_cast<unsigned long long>(ordered_bits(logit)) << 32) |
           (0xffffffffull - static_cast<unsigned long long>(index));
}

__device__ __forceinline__ unsigned token_of(unsigned long long key) {
    return 0xffffffffu - static_cast<unsigned>(key & 0xffffffffull);
}

// Calls f(index, logit) for every element of the row, each once, spread over the block's threads;
// 16-byte loads where the row is aligned.
template <typename T, typename F>
__device__ __forceinline__ void for_each_logit(const T* __restrict__ row, long long vocab, F&& f) {
    constexpr int N = Pack<T>::N;
    long long tail = 0;
    if (is_aligned16(row)) {
        const long long packs = vocab / N;
        for (long long p = threadIdx.x; p < packs; p += blockDim.x) {
            float v[N];
            load_pack<T>(row + p * N, v);
#pragma unroll
            for (int e = 0; e < N; ++e) {
                f(p * N + e, v[e]);
            }
        }
        tail = packs * N;
    }
    for (long long i = tail + threadIdx.x; i < vocab; i += blockDim.x) {
        f(i, to_float(row[i]));
    }
}

// The best (largest, then lowest index) logit seen so far; index NO_TOKEN while none was a number.
struct Best {
    float value;
    unsigned index;
};

__device__ __forceinline__ Best better(Best a, Best b) {
    if (b.index == NO_TOKEN) return a;
    if (a.index == NO_TOKEN) return b;
    if (a.value > b.value) return a;
    if (b.value > a.value) return b;
    return a.index < b.index ? a : b;
}

__device__ __forceinline__ Best warp_best(Best best) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        Best other;
        other.value = __shfl_xor_sync(0xffffffffu, best.value, offset);
        other.index = __shfl_xor_sync(0xffffffffu, best.index, offset);
        best = better(best, other);
    }
    return best;
}

// The block's best logit, in every thread.
__device__ Best block_best(Best best) {
    __shared__ float values[32];
    __shared__ unsigned indices[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    best = warp_best(best);
    __syncthreads();
    if (lane == 0) {
        values[warp] = best.value;
        indices[warp] = best.index;
    }
    __syncthreads();
    Best mine;
    mine.value = lane < warps ? values[lane] : NEG_INF;
    mine.index = lane < warps ? indices[lane] : NO_TOKEN;
    return warp_best(mine);
}

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ double block_sum_f64(double v) {
    __shared__ double partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    v = warp_sum_f64(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    return warp_sum_f64(lane < warps ? partial[lane] : 0.0);
}

__device__ unsigned long long block_count(unsigned long long v) {
    __shared__ unsigned long long partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : 0ull;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Shared state of one radix search.
struct Search {
    double mass[BINS];
    unsigned count[BINS];
    unsigned long long key;
    double above;
    unsigned digit;
    unsigned in_bin;
    int found;
};

// Run by warp 0 alone: the largest digit whose bin, added to the weight `above` of everything ranked
// before the bins and of the bins above it, brings the running total to `target` (strictly past it if
// `strict`). Lane L scans bins 255 - 8L down to 248 - 8L, so lane 0 holds the largest keys.
__device__ void pick_bin(Search& s, double above, double target, bool strict) {
    const unsigned lane = threadIdx.x & 31;
    double local[8];
    double lane_total = 0.0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        local[j] = s.mass[BINS - 1 - 8 * lane - j];
        lane_total += local[j];
    }
    double inclusive = lane_total;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        const double other = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= static_cast<unsigned>(offset)) inclusive += other;
    }
    const double exclusive_prev = __shfl_up_sync(0xffffffffu, inclusive, 1);
    double running = above + (lane == 0 ? 0.0 : exclusive_prev);
    int hit = -1;
    double before_hit = 0.0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const double next = running + local[j];
        const bool reached = strict ? next > target : next >= target;
        // Only a bin holding elements can be the answer; the check also keeps rounding differences
        // between this scan and the lanes before it from landing on an empty bin.
        if (hit < 0 && reached && s.count[BINS - 1 - 8 * lane - j] > 0) {
            hit = j;
            before_hit = running;
        }
        running = next;
    }
    const unsigned lanes_hit = __ballot_sync(0xffffffffu, hit >= 0);
    if (lanes_hit == 0) {
        if (lane == 0) s.found = 0;
        return;
    }
    if (lane == static_cast<unsigned>(__ffs(lanes_hit) - 1)) {
        const unsigned digit = BINS - 1 - 8 * lane - hit;
        s.digit = digit;
        s.above = before_hit;
        s.in_bin = s.count[digit];
        s.found = 1;
    }
}

// Among the elements with weight(index, logit, key) > 0 (NaN logits never count), finds the largest
// sort key c such that the total weight of the elements with key >= c reaches `target` (passes it, if
// `strict`). Only the top `digits` bytes of the key are searched (4: the logit alone). Returns false
// when the total of all elements does not reach the target. Every thread of the block must call it.
template <typename T, typename Weight>
__device__ bool find_threshold(const T* __restrict__ row, long long vocab, Weight weight, double target, bool strict,
                               int digits, Search& s, unsigned long long& result) {
    unsigned long long prefix = 0;
    unsigned long long mask = 0;
    double above = 0.0;
    for (int q = 0; q < digits; ++q) {
        const int shift = 56 - 8 * q;
        for (int b = threadIdx.x; b < BINS; b += blockDim.x) {
            s.mass[b] = 0.0;
            s.count[b] = 0;
        }
        __syncthreads();
        for_each_logit(row, vocab, [&](long long i, float logit) {
            if (is_nan(logit)) return;
            const unsigned long long key = sort_key(logit, i);
            if ((key & mask) != prefix) return;
            const double w = weight(i, logit, key);
            if (w > 0.0) {
                const unsigned d = static_cast<unsigned>(key >> shift) & 0xffu;
                atomicAdd(&s.mass[d], w);
                atomicAdd(&s.count[d], 1u);
            }
        });
        __syncthreads();
        if (threadIdx.x < 32) pick_bin(s, above, target, strict);
        __syncthreads();
        if (!s.found) return false;
        prefix |= static_cast<unsigned long long>(s.digit) << shift;
        mask |= 0xffull << shift;
        above = s.above;
        if (s.in_bin == 1 && q + 1 < digits) {
            // One element left: its key is the answer.
            for_each_logit(row, vocab, [&](long long i, float logit) {
                if (is_nan(logit)) return;
                const unsigned long long key = sort_key(logit, i);
                if ((key & mask) == prefix && weight(i, logit, key) > 0.0) s.key = key;
            });
            __syncthreads();
            result = s.key;
            __syncthreads();
            return true;
        }
    }
    result = prefix;
    return true;
}

template <typename T>
__device__ void argmax_rows(const T* __restrict__ logits, unsigned* __restrict__ out, unsigned long long rows,
                            long long vocab) {
    for (unsigned long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* row = logits + r * vocab;
        Best best{NEG_INF, NO_TOKEN};
        for_each_logit(row, vocab, [&](long long i, float logit) {
            if (!is_nan(logit)) best = better(best, Best{logit, static_cast<unsigned>(i)});
        });
        best = block_best(best);
        if (threadIdx.x == 0) out[r] = best.index;
    }
}

template <typename T>
__device__ void sample_rows(const T* __restrict__ logits, const float* __restrict__ temperature,
                            const unsigned* __restrict__ top_k, const float* __restrict__ top_p,
                            const float* __restrict__ min_p, const float* __restrict__ uniform,
                            unsigned* __restrict__ out, unsigned long long rows, long long vocab) {
    __shared__ Search search;
    for (unsigned long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* row = logits + r * vocab;
        Best best{NEG_INF, NO_TOKEN};
        unsigned long long numbers = 0;
        for_each_logit(row, vocab, [&](long long i, float logit) {
            if (!is_nan(logit)) {
                ++numbers;
                best = better(best, Best{logit, static_cast<unsigned>(i)});
            }
        });
        best = block_best(best);
        numbers = block_count(numbers);

        const float t = temperature[r];
        if (t == 0.0f || best.index == NO_TOKEN || best.value == NEG_INF) {
            if (threadIdx.x == 0) out[r] = t == 0.0f ? best.index : NO_TOKEN;
            continue;
        }
        const float max = best.value;
        const double temp = static_cast<double>(t);
        // softmax(logit / temperature) before normalisation; every +inf logit is equally, infinitely
        // more likely than a finite one.
        auto unnormalised = [=](float logit) -> double {
            if (max == POS_INF) return logit == POS_INF ? 1.0 : 0.0;
            return exp((static_cast<double>(logit) - static_cast<double>(max)) / temp);
        };

        // Top-k: the k-th largest logit; its ties stay.
        unsigned threshold_k = 0;
        const unsigned k = top_k[r];
        if (k > 0 && k < numbers) {
            unsigned long long key = 0;
            find_threshold(row, vocab, [](long long, float, unsigned long long) { return 1.0; },
                           static_cast<double>(k), false, 4, search, key);
            threshold_k = static_cast<unsigned>(key >> 32);
        }

        double z = 0.0;
        for_each_logit(row, vocab, [&](long long, float logit) {
            if (!is_nan(logit) && ordered_bits(logit) >= threshold_k) z += unnormalised(logit);
        });
        z = block_sum_f64(z);
        auto prob = [=](float logit) -> double {
            return ordered_bits(logit) >= threshold_k ? unnormalised(logit) / z : 0.0;
        };

        // Top-p: everything ranked at or before the token where the mass first reaches top_p.
        unsigned long long threshold_p = 0;
        const float p = top_p[r];
        if (p < 1.0f) {
            unsigned long long key = 0;
            if (find_threshold(row, vocab, [=](long long, float logit, unsigned long long) { return prob(logit); },
                               static_cast<double>(p), false, 8, search, key)) {
                threshold_p = key;
            }
        }

        // Min-p, relative to the most likely token, whose unnormalised weight is exactly 1.
        const double min_prob = static_cast<double>(min_p[r]) * (1.0 / z);
        auto kept = [=](float logit, unsigned long long key) -> double {
            if (key < threshold_p) return 0.0;
            const double q = prob(logit);
            return q >= min_prob ? q : 0.0;
        };

        double total = 0.0;
        for_each_logit(row, vocab, [&](long long i, float logit) {
            if (!is_nan(logit)) total += kept(logit, sort_key(logit, i));
        });
        total = block_sum_f64(total);

        unsigned long long key = 0;
        const bool drawn = find_threshold(
            row, vocab, [=](long long, float logit, unsigned long long key) { return kept(logit, key) / total; },
            static_cast<double>(uniform[r]), true, 8, search, key);
        if (!drawn) {
            // Rounding left the draw past the end of the cumulative sum: it belongs to the last kept token.
            unsigned long long survivors = 0;
            for_each_logit(row, vocab, [&](long long i, float logit) {
                if (!is_nan(logit) && kept(logit, sort_key(logit, i)) > 0.0) ++survivors;
            });
            survivors = block_count(survivors);
            find_threshold(
                row, vocab,
                [=](long long, float logit, unsigned long long key) { return kept(logit, key) > 0.0 ? 1.0 : 0.0; },
                static_cast<double>(survivors), false, 8, search, key);
        }
        if (threadIdx.x == 0) out[r] = token_of(key);
    }
}

// Penalties (crates/pagoda-kernels/src/cpu/sampling.rs, Penalties::apply) into an f32 copy of each
// row: the row is converted, then the row's entries (token, occurrences in the output; 0 for a
// prompt-only token), each token once, are patched in the CPU's order with IEEE single roundings
// (no contraction into an FMA).
template <typename T>
__device__ void penalise_rows(const T* __restrict__ logits, float* __restrict__ out,
                              const float* __restrict__ repetition, const float* __restrict__ presence,
                              const float* __restrict__ frequency, const unsigned* __restrict__ offsets,
                              const unsigned* __restrict__ tokens, const unsigned* __restrict__ counts,
                              unsigned long long rows, long long vocab) {
    for (unsigned long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* row = logits + r * vocab;
        float* dst = out + r * vocab;
        for (long long i = threadIdx.x; i < vocab; i += blockDim.x) dst[i] = to_float(row[i]);
        __syncthreads();
        const float rep = repetition[r];
        const float pres = presence[r];
        const float freq = frequency[r];
        for (unsigned e = offsets[r] + threadIdx.x; e < offsets[r + 1]; e += blockDim.x) {
            const unsigned token = tokens[e];
            // The launcher checks the entries against this vocabulary; never write past the row.
            if (token >= vocab) continue;
            float logit = dst[token];
            if (rep != 1.0f) logit = logit > 0.0f ? __fdiv_rn(logit, rep) : __fmul_rn(logit, rep);
            const unsigned count = counts[e];
            if (count > 0) {
                logit = __fsub_rn(logit, __fmul_rn(freq, static_cast<float>(count)));
                logit = __fsub_rn(logit, pres);
            }
            dst[token] = logit;
        }
        __syncthreads();
    }
}

// The logit as logprobs rank it: NaN counts as -inf.
__device__ __forceinline__ float ranked(float logit) { return is_nan(logit) ? NEG_INF : logit; }

// Whether (value, index) comes after (prev_value, prev_index) in descending-value, ascending-index
// order: the candidates of the next top-n pass.
__device__ __forceinline__ bool ranks_after(float value, unsigned index, float prev_value, unsigned prev_index) {
    return value < prev_value || (value == prev_value && index > prev_index);
}

// Logprobs (cpu::sampling::logprobs) of row rows[q] at tokens[q]: the log-sum-exp in f64, then the
// top_n most likely tokens, one block-wide argmax pass each over the tokens ranked after the last
// one found. A row with no number above -inf gets NaN everywhere, for the caller to report. The
// indices come from device memory the launcher cannot check, so a row index at or past
// `logit_rows` gets NaN logprobs and NO_TOKEN ids, and a token at or past `vocab` a NaN `chosen`,
// instead of a read outside the logits.
template <typename T>
__device__ void logprob_rows(const T* __restrict__ logits, const unsigned* __restrict__ rows,
                             const unsigned* __restrict__ tokens, float* __restrict__ chosen,
                             unsigned* __restrict__ top_ids, float* __restrict__ top_logprobs,
                             unsigned long long count, unsigned long long logit_rows, long long vocab,
                             unsigned top_n) {
    const float nan = __int_as_float(0x7fffffff);
    for (unsigned long long q = blockIdx.x; q < count; q += gridDim.x) {
        if (rows[q] >= logit_rows) {
            if (threadIdx.x == 0) chosen[q] = nan;
            for (unsigned n = threadIdx.x; n < top_n; n += blockDim.x) {
                top_ids[q * top_n + n] = NO_TOKEN;
                top_logprobs[q * top_n + n] = nan;
            }
            continue;
        }
        const T* row = logits + static_cast<unsigned long long>(rows[q]) * vocab;
        Best best{NEG_INF, NO_TOKEN};
        unsigned long long infinite = 0;
        for_each_logit(row, vocab, [&](long long i, float logit) {
            logit = ranked(logit);
            if (logit == POS_INF) ++infinite;
            best = better(best, Best{logit, static_cast<unsigned>(i)});
        });
        best = block_best(best);
        infinite = block_count(infinite);
        const double max = static_cast<double>(best.value);
        double sum = 0.0;
        if (infinite == 0 && best.value != NEG_INF) {
            for_each_logit(row, vocab, [&](long long, float logit) { sum += exp(static_cast<double>(ranked(logit)) - max); });
        }
        sum = block_sum_f64(sum);
        const bool none = best.value == NEG_INF;
        const double log_sum_exp = infinite > 0 ? 0.0 : max + log(sum);
        auto logprob = [=](float logit) -> float {
            if (none) return nan;
            logit = ranked(logit);
            if (infinite == 0) return static_cast<float>(static_cast<double>(logit) - log_sum_exp);
            return logit == POS_INF ? static_cast<float>(-log(static_cast<double>(infinite))) : NEG_INF;
        };
        if (threadIdx.x == 0) {
            const unsigned token = tokens[q];
            chosen[q] = token < vocab ? logprob(to_float(row[token])) : nan;
        }
        Best previous{POS_INF, 0};
        for (unsigned n = 0; n < top_n; ++n) {
            Best next{NEG_INF, NO_TOKEN};
            for_each_logit(row, vocab, [&](long long i, float logit) {
                logit = ranked(logit);
                const unsigned index = static_cast<unsigned>(i);
                if (n == 0 || ranks_after(logit, index, previous.value, previous.index)) {
                    // better() treats NO_TOKEN as "none yet", so -inf logits still rank by index.
                    next = better(next, Best{logit, index});
                }
            });
            next = block_best(next);
            if (threadIdx.x == 0) {
                top_ids[q * top_n + n] = next.index;
                top_logprobs[q * top_n + n] = next.index == NO_TOKEN ? NEG_INF : logprob(next.value);
            }
            previous = next;
        }
    }
}

}  // namespace

// penalties_*: logits [rows, vocab] -> out [rows, vocab] f32, with per-row repetition, presence and
// frequency penalties over the entries offsets[r] .. offsets[r + 1] of (tokens, counts).
// logprobs_*: for each q < count, row rows[q] (of logit_rows) at token tokens[q] -> chosen[q], and its
// top_n most likely tokens -> top_ids / top_logprobs [count, top_n]. One block per row (grid-stride).
#define PAGODA_LOGITS_KERNELS(SUFFIX, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(1024)                                                           \
        penalties_##SUFFIX(const T* __restrict__ logits, float* __restrict__ out,                                \
                           const float* __restrict__ repetition, const float* __restrict__ presence,             \
                           const float* __restrict__ frequency, const unsigned* __restrict__ offsets,            \
                           const unsigned* __restrict__ tokens, const unsigned* __restrict__ counts,             \
                           unsigned long long rows, long long vocab) {                                           \
        penalise_rows<T>(logits, out, repetition, presence, frequency, offsets, tokens, counts, rows, vocab);    \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(512)                                                            \
        logprobs_##SUFFIX(const T* __restrict__ logits, const unsigned* __restrict__ rows,                       \
                          const unsigned* __restrict__ tokens, float* __restrict__ chosen,                       \
                          unsigned* __restrict__ top_ids, float* __restrict__ top_logprobs,                      \
                          unsigned long long count, unsigned long long logit_rows, long long vocab,              \
                          unsigned top_n) {                                                                      \
        logprob_rows<T>(logits, rows, tokens, chosen, top_ids, top_logprobs, count, logit_rows, vocab, top_n);   \
    }

PAGODA_FOR_EACH_FLOAT(PAGODA_LOGITS_KERNELS)
#undef PAGODA_LOGITS_KERNELS

// argmax_*: logits [rows, vocab] -> out [rows] (u32). sample_*: the same plus per-row temperature,
// top_k (0 = off), top_p (1 = off), min_p (0 = off) and uniform draw in [0, 1). One block per row
// (grid-stride over rows); blockDim.x a multiple of 32, at most 1024.
#define PAGODA_SAMPLING_KERNELS(SUFFIX, T)                                                                       \
    extern "C" __global__ void __launch_bounds__(1024)                                                           \
        argmax_##SUFFIX(const T* __restrict__ logits, unsigned* __restrict__ out, unsigned long long rows,       \
                        long long vocab) {                                                                       \
        argmax_rows<T>(logits, out, rows, vocab);                                                                \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(512)                                                            \
        sample_##SUFFIX(const T* __restrict__ logits, const float* __restrict__ temperature,                     \
                        const unsigned* __restrict__ top_k, const float* __restrict__ top_p,                     \
                        const float* __restrict__ min_p, const float* __restrict__ uniform,                      \
                        unsigned* __restrict__ out, unsigned long long rows, long long vocab) {                  \
        sample_rows<T>(logits, temperature, top_k, top_p, min_p, uniform, out, rows, vocab);                     \
    }

PAGODA_FOR_EACH_FLOAT(PAGODA_SAMPLING_KERNELS)
