//! Without the `cuda` feature: the signatures of `cuda::nf4`, each failing with
//! [`pagoda_tensor::Error::CudaNotCompiled`]; a [`CudaNf4`] cannot be built.

use std::ops::Range;

use pagoda_tensor::{CudaDevice, DType, Device, Tensor};

use crate::cpu::nf4::Nf4Blocks;
use crate::ops::Epilogue;
use crate::{Error, Result};

/// The most rows of activations the fused NF4 product takes.
pub const FUSED_MAX_ROWS: usize = 64;

/// Uninhabited: no value of the stub types can exist.
#[derive(Clone, Copy, Debug)]
enum Never {}

/// An NF4 tensor on a CUDA device; cannot be built without the `cuda` feature.
pub struct CudaNf4 {
    never: Never,
}

impl CudaNf4 {
    /// Always fails without the `cuda` feature.
    pub fn new(_blocks: &Nf4Blocks, _device: &CudaDevice) -> Result<Self> {
        Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        match self.never {}
    }

    pub fn is_empty(&self) -> bool {
        match self.never {}
    }

    /// Values per block.
    pub fn block_size(&self) -> usize {
        match self.never {}
    }

    /// Bytes of device memory the codes and scales take.
    pub fn storage_bytes(&self) -> usize {
        match self.never {}
    }

    /// The packed codes, U8.
    pub fn packed(&self) -> &Tensor {
        match self.never {}
    }

    /// The device the tensor lives on.
    pub fn device(&self) -> Device {
        match self.never {}
    }
}

/// Decodes NF4 on the GPU; always fails without the `cuda` feature.
pub fn dequantize(_w: &CudaNf4, _start: usize, _dims: &[usize], _dtype: DType) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}

/// Whether the fused NF4 product takes these operands; never without the `cuda` feature.
pub fn fused_linear_supported(_dtype: DType, _m: usize, _k: usize, _block_size: usize) -> bool {
    false
}

/// The fused NF4 product on the GPU; always fails without the `cuda` feature.
pub fn linear(
    _x: &Tensor,
    _w: &CudaNf4,
    _k: usize,
    _rows: Range<usize>,
    _bias: Option<&Tensor>,
    _epilogue: Epilogue<'_>,
) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}

/// The fused NF4 product into a given output on the GPU; always fails without the `cuda`
/// feature.
pub fn linear_into(
    _x: &Tensor,
    _w: &CudaNf4,
    _k: usize,
    _rows: Range<usize>,
    _bias: Option<&Tensor>,
    _epilogue: Epilogue<'_>,
    _out: &mut Tensor,
) -> Result<()> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}
