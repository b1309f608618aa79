//! Where a model's tensors come from, and the checks that make a wrong checkpoint fail with the
//! tensor's name instead of a wrong answer.

use pagoda_kernels::ops::Nf4Weight;
use pagoda_tensor::safetensors::SafeTensors;
use pagoda_tensor::{DType, Device, Tensor};

use crate::bnb;
use crate::load_progress::LoadTracker;
use crate::quantization::{LayerRole, LinearWeight, Quantization, RawWeight};
use crate::{Error, Result};

/// A store of named tensors, under Hugging Face names.
pub(crate) trait WeightSource {
    fn contains(&self, name: &str) -> bool;
    /// The tensor as stored, when it is a dtype matrices can be used in without conversion.
    fn load_matrix(&self, name: &str) -> Result<Tensor>;
    fn load_f32(&self, name: &str) -> Result<Tensor>;
    /// The tensor as stored, whatever its dtype (packed quantized weights, their metadata).
    fn load_raw(&self, name: &str) -> Result<Tensor>;
    /// Bytes the tensor takes in the checkpoint; `None` if it is missing or unreadable.
    fn stored_bytes(&self, name: &str) -> Option<u64>;
    /// Bytes and count of all the readable tensors in the checkpoint.
    fn stored_total(&self) -> (u64, usize);
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

    fn load_raw(&self, name: &str) -> Result<Tensor> {
        Ok(self.get(name)?)
    }

    fn stored_bytes(&self, name: &str) -> Option<u64> {
        let (dtype, shape) = self.info(name)?;
        Some((shape.iter().product::<usize>() * dtype.size_in_bytes()) as u64)
    }

    fn stored_total(&self) -> (u64, usize) {
        self.names()
            .into_iter()
            .filter_map(|name| WeightSource::stored_bytes(self, name))
            .fold((0, 0), |(bytes, count), b| (bytes + b, count + 1))
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
    /// Which dense linear weights to quantize as they load.
    quantization: Option<Quantization>,
    /// Told each time a tensor is placed; `source` counts the reads.
    tracker: Option<&'a LoadTracker>,
}

impl<'a> WeightLoader<'a> {
    pub(crate) fn new(
        source: &'a dyn WeightSource,
        device: Device,
        matrix_dtype: Option<DType>,
        quantization: Option<Quantization>,
        tracker: Option<&'a LoadTracker>,
    ) -> Self {
        Self {
            source,
            placed_bytes: std::cell::Cell::new(0),
            device,
            matrix_dtype,
            quantization,
            tracker,
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
        let placed = tensor.to_device(&self.device)?;
        self.report_progress();
        Ok(placed)
    }

    fn report_progress(&self) {
        if let Some(tracker) = self.tracker {
            tracker.report();
        }
    }

    pub(crate) fn placed_bytes(&self) -> usize {
        self.placed_bytes.get()
    }

    /// A linear layer's weight `[rows, cols]` on the host as the checkpoint stores it: NF4 when
    /// bitsandbytes saved it so, else dense.
    pub(crate) fn raw_linear_weight(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<RawWeight> {
        if bnb::is_stored_4bit(self.source, name) {
            let blocks = bnb::load_nf4(self.source, name, rows, cols)?;
            return Ok(RawWeight::Nf4 { blocks, rows, cols });
        }
        Ok(RawWeight::Dense(self.raw_matrix(name, rows, cols)?))
    }

    /// Puts a linear layer's weight where the model runs: NF4 if it is stored so or the load
    /// options quantize weights of `role` (named `name` in errors), else dense in the matrix
    /// dtype.
    pub(crate) fn place_linear_weight(
        &self,
        raw: RawWeight,
        role: LayerRole,
        name: &str,
    ) -> Result<LinearWeight> {
        let nf4 = self.quantization.and_then(|q| q.nf4_for(role));
        let (blocks, rows, cols) = match (raw, nf4) {
            (RawWeight::Dense(tensor), None) => {
                return Ok(LinearWeight::Dense(self.place_matrix(tensor)?));
            }
            (raw, options) => raw.into_nf4(&options.unwrap_or_default(), name)?,
        };
        let weight = Nf4Weight::new(blocks, rows, cols, &self.device)?;
        self.placed_bytes
            .set(self.placed_bytes.get() + weight.storage_bytes());
        self.report_progress();
        Ok(LinearWeight::Nf4(weight))
    }

    /// [`Self::raw_linear_weight`] then [`Self::place_linear_weight`], the role read off the name.
    pub(crate) fn linear_weight(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<LinearWeight> {
        let raw = self.raw_linear_weight(name, rows, cols)?;
        self.place_linear_weight(raw, LayerRole::of(name), name)
    }

    /// Whether the load options store weights of `role` in NF4.
    pub(crate) fn nf4_selected(&self, role: LayerRole) -> bool {
        self.quantization.and_then(|q| q.nf4_for(role)).is_some()
    }

    /// The settings dense parts are quantized with when joined to NF4 parts.
    pub(crate) fn nf4_options(&self, role: LayerRole) -> crate::Nf4Options {
        self.quantization
            .and_then(|q| q.nf4_for(role))
            .unwrap_or_default()
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
