/// Errors from the engine. `InvalidRequest` is the caller's to fix (empty prompt, too long,
/// bad sampling values); the others come from the model files or the machine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// The engine's step loop has ended (shut down, or its thread could not start).
    #[error("the engine has stopped")]
    Stopped,
    #[error(transparent)]
    Model(#[from] pagoda_models::Error),
    #[error(transparent)]
    Tensor(#[from] pagoda_tensor::Error),
    #[error(transparent)]
    Kv(#[from] pagoda_kv::Error),
    #[error(transparent)]
    Kernel(#[from] pagoda_kernels::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
