//! Reader for GGUF, the single-file checkpoint format of ggml / llama.cpp:
//! header, typed metadata, tensor table, and an aligned data section of
//! (possibly block-quantized) tensors that are dequantized on load.
//!
//! Format reference: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>.

mod ggml_type;
mod quant;
mod reader;
mod value;

pub use ggml_type::GgmlType;
pub use reader::GgufFile;
pub use value::GgufValue;

/// One entry of a GGUF file's tensor table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// The tensor's name.
    pub name: String,
    /// Dimensions, outermost first (ggml's `ne` stores them innermost first).
    pub dims: Vec<usize>,
    /// How the elements are encoded.
    pub ggml_type: GgmlType,
    /// Byte offset of the data from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// The number of elements.
    pub fn elem_count(&self) -> usize {
        self.dims.iter().product()
    }
}
