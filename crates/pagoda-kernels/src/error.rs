/// Errors from kernel launchers: inputs whose sizes disagree with the dimensions given, values
/// out of range, invalid sampling settings.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A slice length, dimension or index disagrees with the others given to `op`.
    #[error("{op}: {message}")]
    Shape { op: &'static str, message: String },
    /// A numeric setting of `op` (a RoPE base, a scaling factor) is outside its valid range.
    #[error("{op}: {message}")]
    InvalidParameter { op: &'static str, message: String },
    #[error("invalid sampling parameter: {0}")]
    InvalidSampling(String),
    /// A tensor given to `op` has a dtype the op does not take, or one that disagrees with
    /// another input's.
    #[error("{op}: {message}")]
    DType { op: &'static str, message: String },
    /// A tensor given to `op` lives on a device the op cannot use (the host, or another GPU than
    /// the other inputs).
    #[error("{op}: {message}")]
    Device { op: &'static str, message: String },
    /// A CUDA launcher was given a strided view; kernels read rows densely, and copying a
    /// view through the host behind the caller's back would hide a slow path.
    #[error("{op}: {name} is not contiguous; call `contiguous()` first")]
    NotContiguous { op: &'static str, name: String },
    /// The CUDA driver or cuBLAS failed while `op` ran; the message names the call and device.
    #[error("CUDA error in {op}: {message}")]
    Cuda { op: &'static str, message: String },
    /// NVRTC could not compile the kernel source `module` for `target`; `log` is the compiler's.
    #[error("NVRTC failed to compile kernels/{module}.cu for {target}:\n{log}")]
    Nvrtc {
        module: &'static str,
        target: String,
        log: String,
    },
    #[error(transparent)]
    Tensor(#[from] pagoda_tensor::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn shape(op: &'static str, message: impl Into<String>) -> Self {
        Error::Shape {
            op,
            message: message.into(),
        }
    }

    // The next three are raised only by the CUDA launchers.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn dtype(op: &'static str, message: impl Into<String>) -> Self {
        Error::DType {
            op,
            message: message.into(),
        }
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn device(op: &'static str, message: impl Into<String>) -> Self {
        Error::Device {
            op,
            message: message.into(),
        }
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn cuda(op: &'static str, message: impl std::fmt::Display) -> Self {
        Error::Cuda {
            op,
            message: message.to_string(),
        }
    }
}

/// Checks that a slice called `name` holds exactly the product of `dims` elements; the product is
/// computed with overflow checks, so absurd dimensions are an error rather than a wrap-around.
pub(crate) fn expect_len(op: &'static str, name: &str, len: usize, dims: &[usize]) -> Result<()> {
    let expected = checked_product(op, dims)?;
    if len == expected {
        return Ok(());
    }
    let dims = dims
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" x ");
    Err(Error::shape(
        op,
        format!("{name} has {len} elements, expected {expected} = {dims}"),
    ))
}

/// The product of `dims`, or a shape error when it does not fit in `usize`.
pub(crate) fn checked_product(op: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::shape(op, format!("dimensions {dims:?} overflow usize")))
}
