// The activation functions kernels apply elementwise (activation.cu) or in the epilogue of a
// product (gemv.cu), as functors on float.

#pragma once

// 0.5 x (1 + erf(x / sqrt 2)) written as 0.5 x erfc(-x / sqrt 2), which keeps its relative
// accuracy for very negative x where 1 + erf(...) would cancel.
struct GeluExact {
    __device__ float operator()(float x) const { return 0.5f * x * erfcf(-x * 0.70710678118654752f); }
};

// 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3): Hendrycks & Gimpel, "Gaussian
// Error Linear Units", 2016, section 2. Evaluated as x / (1 + e^(-2u)), the same function
// (1 + tanh(u) = 2 / (1 + e^(-2u))), because 1 + tanh(u) cancels to nothing in float once
// tanh(u) is within an ulp of -1 (x below about -5), while the quotient keeps its relative
// accuracy; for u -> -inf, e^(-2u) overflows to inf and the quotient is -0, the right limit.
struct GeluTanh {
    __device__ float operator()(float x) const {
        const float u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
        return x / (1.0f + expf(-2.0f * u));
    }
};

// silu(g) * u = g / (1 + e^-g) * u. For g -> -inf, e^-g overflows to inf and the quotient is
// -0, the right limit.
struct SiluMul {
    __device__ float operator()(float g, float u) const { return g / (1.0f + expf(-g)) * u; }
};
