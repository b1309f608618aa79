//! Launcher of `kernels/embedding.cu`: gathers one table row per token id.

use pagoda_tensor::cudarc::driver::{LaunchConfig, PushKernelArg};
use pagoda_tensor::{DType, Tensor};

use super::registry::{KernelModule, function};
use super::tensor_access::{
    FLOAT_DTYPES, alloc_output, arg_u32, common_device, device_view, dims_of, expect_dtype,
    into_tensor, kernel_name, launch_error,
};
use crate::Result;

/// `out[t] = table[ids[t]]`: a `[tokens, hidden]` tensor of the table's dtype from a
/// `[vocab, hidden]` table and U32 `ids` of shape `[tokens]`.
///
/// The ids stay on the device, so they are not checked here: callers validate them where they
/// are produced. An id `>= vocab` gives a row of zeros rather than a read out of bounds.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    const OP: &str = "embedding";
    let device = common_device(OP, &[("table", table), ("ids", ids)])?;
    expect_dtype(OP, "table", table, &FLOAT_DTYPES)?;
    expect_dtype(OP, "ids", ids, &[DType::U32])?;
    let [vocab, hidden] = dims_of(OP, "table", table)?;
    let [tokens] = dims_of(OP, "ids", ids)?;
    let dims = [tokens, hidden];
    let mut out = alloc_output(OP, &device, table.dtype(), &dims)?;
    if tokens == 0 || hidden == 0 {
        return into_tensor(out, &dims);
    }
    let name = kernel_name(OP, "embedding", table.dtype())?;
    let kernel = function(&device, KernelModule::Embedding, &name)?;
    let table_view = device_view(OP, "table", table)?;
    let ids_view = device_view(OP, "ids", ids)?;
    // A vocabulary past u32 cannot be indexed by U32 ids anyway; clamping keeps every id valid.
    let vocab = u32::try_from(vocab).unwrap_or(u32::MAX);
    let hidden_arg = arg_u32(OP, "hidden", hidden)?;
    let grid = arg_u32(OP, "tokens", tokens)?;
    // One thread per 16-byte word of a row, in whole warps, at most 256.
    let words = (hidden * table.dtype().size_in_bytes()).div_ceil(16);
    let threads = words.next_multiple_of(32).clamp(32, 256) as u32;
    let config = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let stream = device.stream();
    let mut launch = stream.launch_builder(&kernel);
    launch
        .arg(&table_view)
        .arg(&ids_view)
        .arg(out.slice_mut())
        .arg(&vocab)
        .arg(&hidden_arg);
    // SAFETY: (table, ids, out, vocab, hidden) matches the kernel; the table holds vocab x hidden
    // elements, ids `tokens` u32 values, out tokens x hidden elements, one block per token; the
    // kernel never reads a row at or past `vocab`.
    unsafe { launch.launch(config) }.map_err(|e| launch_error(OP, &name, e))?;
    into_tensor(out, &dims)
}
