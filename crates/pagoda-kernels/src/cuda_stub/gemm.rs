//! Without the `cuda` feature: the signatures of `cuda::gemm`, each failing with
//! [`pagoda_tensor::Error::CudaNotCompiled`].

use pagoda_tensor::Tensor;

use crate::ops::Epilogue;
use crate::{Error, Result};

/// `x · wᵀ (+ bias)` on the GPU; always fails without the `cuda` feature.
pub fn linear(_x: &Tensor, _w: &Tensor, _bias: Option<&Tensor>) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}

/// Batched `a[i] · b[i]` on the GPU; always fails without the `cuda` feature.
pub fn matmul_strided_batched(_a: &Tensor, _b: &Tensor) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}

/// The most rows of `x` the fused decode-time product takes.
pub const EPILOGUE_MAX_ROWS: usize = 8;

/// Up to this many rows the CUDA build runs decode products on its GEMV.
pub const DECODE_MAX_ROWS: usize = 2;

/// A product with its elementwise epilogue on the GPU; always fails without the `cuda` feature.
pub fn linear_with_epilogue(
    _x: &Tensor,
    _w: &Tensor,
    _bias: Option<&Tensor>,
    _epilogue: Epilogue<'_>,
) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}

/// Two decode-sized products into the same outputs; always fails without the `cuda` feature.
pub fn linear_pair(
    _first: (&Tensor, &Tensor, Option<&Tensor>),
    _second: (&Tensor, &Tensor, Option<&Tensor>),
    _addend: Option<&Tensor>,
) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}

/// One decode-sized product of [`linear_side_by_side`] (see the `cuda` build).
#[derive(Clone, Copy, Debug)]
pub struct LinearJob<'a> {
    pub x: &'a Tensor,
    pub w: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub epilogue: Epilogue<'a>,
}

/// Two independent decode-sized products in one launch; always fails without the `cuda`
/// feature.
pub fn linear_side_by_side(_a: LinearJob<'_>, _b: LinearJob<'_>) -> Result<(Tensor, Tensor)> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}
