//! Where a model's tensors come from, and the checks that make a wrong checkpoint fail with the
//! tensor's name instead of a wrong answer.

use pagoda_tensor::safetensors::SafeTensors;
use pagoda_tensor::{DType, Device, Tensor};

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

/// Loads tensors from a [`WeightSource`], checks their shapes, and puts them where the model
/// runs: matrices in the model's weight dtype, vectors (norm weights, biases) in f32.
pub(crate) struct WeightLoader<'a> {
    source: &'a dyn WeightSource,
    /// Bytes of every tensor placed so far: what a forward pass reads.
    placed_bytes: std::cell::Cell<usize>,
    device: Device,
    /// `None` keeps each matrix's stored dtype.
    matrix_dtype: Option<DType>,
}

impl<'a> WeightLoader<'a> {
    pub(crate) fn new(
        source: &'a dyn WeightSource,
        device: Device,
        matrix_dtype: Option<DType>,
    ) -> Self {
        Self {
            source,
            placed_bytes: std::cell::Cell::new(0),
            device,
            matrix_dtype,
        }
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.source.contains(name)
    }

    /// A `[rows, cols]` weight matrix, still on the CPU in its stored dtype, for loaders that
    /// rearrange it before [`place_matrix`](Self::place_matrix).
    pub(crate) fn raw_matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor> {
        let tensor = self.source.load_matrix(name)?;
        check_shape(name, &tensor, &[rows, cols])?;
        Ok(tensor)
    }

    /// A vector on the CPU in f32, for loaders that rearrange it before
    /// [`place_vector`](Self::place_vector).
    pub(crate) fn raw_vector(&self, name: &str, len: usize) -> Result<Tensor> {
        let tensor = self.source.load_f32(name)?;
        check_shape(name, &tensor, &[len])?;
        Ok(tensor)
    }

    pub(crate) fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor> {
        self.place_matrix(self.raw_matrix(name, rows, cols)?)
    }

    pub(crate) fn vector(&self, name: &str, len: usize) -> Result<Tensor> {
        self.place_vector(self.raw_vector(name, len)?)
    }

    pub(crate) fn place_matrix(&self, tensor: Tensor) -> Result<Tensor> {
        let tensor = match self.matrix_dtype {
            Some(dtype) if dtype != tensor.dtype() => tensor.to_dtype(dtype)?,
            _ => tensor.contiguous()?,
        };
        self.place(tensor)
    }

    pub(crate) fn place_vector(&self, tensor: Tensor) -> Result<Tensor> {
        self.place(tensor.contiguous()?)
    }

    fn place(&self, tensor: Tensor) -> Result<Tensor> {
        let bytes = tensor.elem_count() * tensor.dtype().size_in_bytes();
        self.placed_bytes.set(self.placed_bytes.get() + bytes);
        Ok(tensor.to_device(&self.device)?)
    }

    pub(crate) fn placed_bytes(&self) -> usize {
        self.placed_bytes.get()
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
