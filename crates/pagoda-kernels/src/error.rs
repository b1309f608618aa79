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
    #[error(transparent)]
    Tensor(#[from] pagoda_tensor::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn shape(op: &'static str, message: impl Into<String>) -> Self {
        Error::Shape { op, message: message.into() }
    }
}

/// Checks that a slice called `name` holds exactly the product of `dims` elements; the product is
/// computed with overflow checks, so absurd dimensions are an error rather than a wrap-around.
pub(crate) fn expect_len(op: &'static str, name: &str, len: usize, dims: &[usize]) -> Result<()> {
    let expected = checked_product(op, dims)?;
    if len == expected {
        return Ok(());
    }
    let dims = dims.iter().map(ToString::to_string).collect::<Vec<_>>().join(" x ");
    Err(Error::shape(op, format!("{name} has {len} elements, expected {expected} = {dims}")))
}

/// The product of `dims`, or a shape error when it does not fit in `usize`.
pub(crate) fn checked_product(op: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::shape(op, format!("dimensions {dims:?} overflow usize")))
}
