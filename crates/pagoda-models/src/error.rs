use std::path::PathBuf;

/// Errors from reading a model's configuration and weights or running it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("unknown architecture `{0}` (supported: GPTNeoXForCausalLM, LlamaForCausalLM)")]
    UnknownArchitecture(String),
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    WeightShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("tensor `{name}` has dtype {dtype}, which a {what} cannot use")]
    WeightDType {
        name: String,
        dtype: pagoda_tensor::DType,
        what: &'static str,
    },
    /// A quantized weight that cannot be read or made: an unsupported format, a malformed
    /// quantization state, shapes that cannot be stacked.
    #[error("quantized tensor `{name}`: {message}")]
    Quantization { name: String, message: String },
    #[error("invalid batch: {0}")]
    Batch(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tensor(#[from] pagoda_tensor::Error),
    #[error(transparent)]
    Kernel(#[from] pagoda_kernels::Error),
    #[error(transparent)]
    Kv(#[from] pagoda_kv::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
