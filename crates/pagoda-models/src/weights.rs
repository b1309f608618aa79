//! Where a model's tensors come from, and the shape checks that make a wrong checkpoint fail
//! with the tensor's name instead of a wrong answer.

use pagoda_kernels::cpu::gemm::Weights;
use pagoda_tensor::safetensors::SafeTensors;
use pagoda_tensor::{DType, Tensor};

use crate::{Error, Result};

/// A store of named tensors, under Hugging Face names.
pub(crate) trait WeightSource {
    fn contains(&self, name: &str) -> bool;
    /// The tensor as stored, when it is a dtype matrices can be used in without conversion.
    fn load_matrix(&self, name: &str) -> Result<Tensor>;
    fn load_f32(&self, name: &str) -> Result<Tensor>;
}

impl WeightSource for SafeTensors {
    fn contains(&self, name: &str) -> bool {
        SafeTensors::contains(self, name)
    }

    fn load_matrix(&self, name: &str) -> Result<Tensor> {
        let tensor = self.get(name)?;
        match tensor.dtype() {
            DType::F32 | DType::F16 | DType::BF16 => Ok(tensor),
            dtype => Err(Error::WeightDType {
                name: name.into(),
                dtype,
                what: "matrix multiplication",
            }),
        }
    }

    fn load_f32(&self, name: &str) -> Result<Tensor> {
        Ok(self.get_as(name, DType::F32)?)
    }
}

/// Loads tensors from a [`WeightSource`] and checks their shapes.
pub(crate) struct WeightLoader<'a> {
    source: &'a dyn WeightSource,
}

impl<'a> WeightLoader<'a> {
    pub(crate) fn new(source: &'a dyn WeightSource) -> Self {
        Self { source }
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.source.contains(name)
    }

    /// A `[rows, cols]` weight matrix in its stored float dtype.
    pub(crate) fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor> {
        let tensor = self.source.load_matrix(name)?;
        check_shape(name, &tensor, &[rows, cols])?;
        Ok(tensor.contiguous()?)
    }

    /// A vector (norm weight, bias) as f32.
    pub(crate) fn vector(&self, name: &str, len: usize) -> Result<Tensor> {
        let tensor = self.source.load_f32(name)?;
        check_shape(name, &tensor, &[len])?;
        Ok(tensor.contiguous()?)
    }
}

fn check_shape(name: &str, tensor: &Tensor, expected: &[usize]) -> Result<()> {
    if tensor.dims() == expected {
        Ok(())
    } else {
        Err(Error::WeightShape {
            name: name.into(),
            expected: expected.to_vec(),
            got: tensor.dims().to_vec(),
        })
    }
}

/// Borrows a contiguous CPU float tensor as GEMM weights.
pub(crate) fn as_weights(tensor: &Tensor) -> Result<Weights<'_>> {
    Ok(match tensor.dtype() {
        DType::F32 => Weights::F32(tensor.as_slice()?),
        DType::F16 => Weights::F16(tensor.as_slice()?),
        DType::BF16 => Weights::BF16(tensor.as_slice()?),
        dtype => {
            return Err(Error::WeightDType {
                name: "matrix".into(),
                dtype,
                what: "matrix multiplication",
            });
        }
    })
}
