//! Launchers of `kernels/kv_write.cu`: scattering a batch's new keys and values into the paged KV
//! cache, `[num_blocks, block_size, kv_heads, head_dim]` per layer, slot = `block * block_size +
//! offset`, as [`crate::cpu::kv_write::write_kv`] does.
//!
//! [`rope_write_kv`] applies RoPE to the keys on their way into the pages; in the model it replaces
//! [`apply_rope`](super::rope::apply_rope) on K followed by [`write_kv`], reading K once instead of
//! three times.

use pagoda_tensor::cudarc::driver::{LaunchConfig, PushKernelArg};
use pagoda_tensor::{CudaDevice, CudaStorage, DType, Tensor};

use super::registry::{KernelModule, function};
use super::rope::CudaRopeTable;
use super::tensor_access::{
    FLOAT_DTYPES, alloc_output, arg_u32, common_device, device_view, device_view_mut, dims_of,
    expect_dims, expect_dtype, expect_same_dtype, into_tensor, kernel_name, launch_error,
};
use crate::{Error, Result};

/// Copies token `t`'s keys `k[t]` and values `v[t]` (each `[tokens, kv_heads, head_dim]`) into slot
/// `slots[t]` (U32 `[tokens]`) of `k_pages` and `v_pages` (`[num_blocks, block_size, kv_heads,
/// head_dim]`, the dtype of `k` and `v`).
///
/// The slots stay on the device and are not checked here: a slot at or past `num_blocks *
/// block_size` is skipped, so padded rows may carry `u32::MAX`. Two tokens must not name the same
/// slot (which one would remain is unspecified).
pub fn write_kv(
    k: &Tensor,
    v: &Tensor,
    slots: &Tensor,
    k_pages: &mut Tensor,
    v_pages: &mut Tensor,
) -> Result<()> {
    const OP: &str = "write_kv";
    let write = Write::check(OP, k, v, slots, None, k_pages, v_pages)?;
    if write.tokens == 0 {
        return Ok(());
    }
    let name = kernel_name(OP, "write_kv", k.dtype())?;
    let kernel = function(&write.device, KernelModule::KvWrite, &name)?;
    let (k_view, v_view, slots_view) = (
        device_view(OP, "k", k)?,
        device_view(OP, "v", v)?,
        device_view(OP, "slots", slots)?,
    );
    let mut k_pages_view = device_view_mut(OP, "k_pages", k_pages)?;
    let mut v_pages_view = device_view_mut(OP, "v_pages", v_pages)?;
    let tokens = arg_u32(OP, "tokens", write.tokens)?;
    let token_len = arg_u32(OP, "kv_heads x head_dim", write.kv_heads * write.head_dim)?;
    let stream = write.device.stream();
    let mut launch = stream.launch_builder(&kernel);
    launch
        .arg(&k_view)
        .arg(&v_view)
        .arg(&slots_view)
        .arg(&mut k_pages_view)
        .arg(&mut v_pages_view)
        .arg(&tokens)
        .arg(&token_len)
        .arg(&write.num_slots);
    // SAFETY: the arguments follow write_kv's signature in kv_write.cu (k, v, slots, k_pages,
    // v_pages, tokens, token_len, num_slots); k and v hold tokens x token_len elements of the
    // kernel name's dtype, slots `tokens` u32 values, each page tensor num_slots x token_len
    // elements, and the kernel skips slots at or past num_slots.
    unsafe { launch.launch(write.config(tokens)) }.map_err(|e| launch_error(OP, &name, e))?;
    Ok(())
}

/// [`write_kv`] with the keys rotated by RoPE (as [`apply_rope`](super::rope::apply_rope) would,
/// at `positions[t]`, U32 `[tokens]`) on their way into `k_pages`; `k` itself is not modified.
///
/// A position at or past the table's `max_positions` writes NaN into that token's rotated key
/// dimensions.
#[allow(clippy::too_many_arguments)]
pub fn rope_write_kv(
    k: &Tensor,
    v: &Tensor,
    positions: &Tensor,
    slots: &Tensor,
    table: &CudaRopeTable,
    k_pages: &mut Tensor,
    v_pages: &mut Tensor,
) -> Result<()> {
    launch_rope_write(
        "rope_write_kv",
        None,
        k,
        v,
        positions,
        slots,
        table,
        k_pages,
        v_pages,
    )
}

/// [`rope_write_kv`], and the queries `q` (`[tokens, heads, head_dim]`, `k`'s dtype) rotated the
/// same way, returned as a new tensor: the RoPE of a whole attention layer in one launch. `q`
/// is only read, so it may be a view sharing its storage with `k` and `v` (a fused Q/K/V
/// projection's output).
#[allow(clippy::too_many_arguments)]
pub fn rope_qk_write_kv(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    positions: &Tensor,
    slots: &Tensor,
    table: &CudaRopeTable,
    k_pages: &mut Tensor,
    v_pages: &mut Tensor,
) -> Result<Tensor> {
    const OP: &str = "rope_qk_write_kv";
    expect_same_dtype(OP, "q", q, "k", k.dtype())?;
    let [tokens, _, head_dim] = dims_of(OP, "q", q)?;
    let [k_tokens, _, k_head_dim] = dims_of(OP, "k", k)?;
    if (tokens, head_dim) != (k_tokens, k_head_dim) {
        return Err(Error::shape(
            OP,
            format!("q is {:?} but k is {:?}", q.dims(), k.dims()),
        ));
    }
    let device = common_device(OP, &[("q", q), ("k", k)])?;
    let mut out = alloc_output(OP, &device, q.dtype(), q.dims())?;
    launch_rope_write(
        OP,
        Some((q, &mut out)),
        k,
        v,
        positions,
        slots,
        table,
        k_pages,
        v_pages,
    )?;
    into_tensor(out, q.dims())
}

#[allow(clippy::too_many_arguments)]
fn launch_rope_write(
    op: &'static str,
    q: Option<(&Tensor, &mut CudaStorage)>,
    k: &Tensor,
    v: &Tensor,
    positions: &Tensor,
    slots: &Tensor,
    table: &CudaRopeTable,
    k_pages: &mut Tensor,
    v_pages: &mut Tensor,
) -> Result<()> {
    let write = Write::check(op, k, v, slots, Some((positions, table)), k_pages, v_pages)?;
    let (rotary_dim, max_positions) = table.kernel_args(op, write.head_dim)?;
    if write.tokens == 0 {
        return Ok(());
    }
    let name = kernel_name(op, "rope_write_kv", k.dtype())?;
    let kernel = function(&write.device, KernelModule::KvWrite, &name)?;
    let (k_view, v_view) = (device_view(op, "k", k)?, device_view(op, "v", v)?);
    let (positions_view, slots_view) = (
        device_view(op, "positions", positions)?,
        device_view(op, "slots", slots)?,
    );
    let (cos, sin) = (
        device_view(op, "cos", table.cos())?,
        device_view(op, "sin", table.sin())?,
    );
    let (q_tensor, q_out) = match q {
        Some((q, out)) => (Some(q), Some(out)),
        None => (None, None),
    };
    let q_view = q_tensor.map(|q| device_view(op, "q", q)).transpose()?;
    let q_heads = arg_u32(op, "q heads", q_tensor.map_or(0, |q| q.dims()[1]))?;
    let mut k_pages_view = device_view_mut(op, "k_pages", k_pages)?;
    let mut v_pages_view = device_view_mut(op, "v_pages", v_pages)?;
    let tokens = arg_u32(op, "tokens", write.tokens)?;
    let kv_heads = arg_u32(op, "kv_heads", write.kv_heads)?;
    let head_dim = arg_u32(op, "head_dim", write.head_dim)?;
    arg_u32(op, "kv_heads x head_dim", write.kv_heads * write.head_dim)?;
    arg_u32(op, "q heads x head_dim", q_heads as usize * write.head_dim)?;
    let stream = write.device.stream();
    let mut launch = stream.launch_builder(&kernel);
    // Without queries the kernel tests q against null and never touches q_out.
    let null: u64 = 0;
    match (q_view.as_ref(), q_out) {
        (Some(q), Some(out)) => launch.arg(q).arg(out.slice_mut()),
        _ => launch.arg(&null).arg(&null),
    };
    launch
        .arg(&q_heads)
        .arg(&k_view)
        .arg(&v_view)
        .arg(&positions_view)
        .arg(&slots_view)
        .arg(&cos)
        .arg(&sin)
        .arg(&mut k_pages_view)
        .arg(&mut v_pages_view)
        .arg(&tokens)
        .arg(&kv_heads)
        .arg(&head_dim)
        .arg(&rotary_dim)
        .arg(&max_positions)
        .arg(&write.num_slots);
    // SAFETY: the arguments follow rope_write_kv's signature in kv_write.cu; q and q_out (or
    // null) hold tokens x q_heads x head_dim elements, k and v tokens x kv_heads x head_dim, of
    // the kernel name's dtype; positions and slots `tokens` u32 values, cos and sin
    // max_positions x rotary_dim / 2 f32 values (rotary_dim <= head_dim, checked), each page
    // tensor num_slots x kv_heads x head_dim elements; the kernel skips slots at or past
    // num_slots and reads the table only below max_positions.
    let config = write.rope_config(tokens, q_heads as usize);
    unsafe { launch.launch(config) }.map_err(|e| launch_error(op, &name, e))?;
    Ok(())
}

/// Threads per block of rope_write_kv.
const ROPE_THREADS: u32 = 128;

/// The checked geometry of one KV write.
struct Write {
    device: CudaDevice,
    tokens: usize,
    kv_heads: usize,
    head_dim: usize,
    num_slots: u64,
}

impl Write {
    fn check(
        op: &'static str,
        k: &Tensor,
        v: &Tensor,
        slots: &Tensor,
        rope: Option<(&Tensor, &CudaRopeTable)>,
        k_pages: &Tensor,
        v_pages: &Tensor,
    ) -> Result<Write> {
        let mut tensors = vec![
            ("k", k),
            ("v", v),
            ("slots", slots),
            ("k_pages", k_pages),
            ("v_pages", v_pages),
        ];
        if let Some((positions, table)) = rope {
            tensors.extend([("positions", positions), ("table", table.cos())]);
        }
        let device = common_device(op, &tensors)?;
        expect_dtype(op, "k", k, &FLOAT_DTYPES)?;
        for (name, tensor) in [("v", v), ("k_pages", k_pages), ("v_pages", v_pages)] {
            expect_same_dtype(op, name, tensor, "k", k.dtype())?;
        }
        let [tokens, kv_heads, head_dim] = dims_of(op, "k", k)?;
        expect_dims(op, "v", v, k.dims())?;
        expect_dtype(op, "slots", slots, &[DType::U32])?;
        expect_dims(op, "slots", slots, &[tokens])?;
        if let Some((positions, _)) = rope {
            expect_dtype(op, "positions", positions, &[DType::U32])?;
            expect_dims(op, "positions", positions, &[tokens])?;
        }
        let [num_blocks, block_size, page_heads, page_dim] = dims_of(op, "k_pages", k_pages)?;
        if (page_heads, page_dim) != (kv_heads, head_dim) {
            return Err(Error::shape(
                op,
                format!(
                    "k_pages hold {page_heads} heads of {page_dim}, k has {kv_heads} heads of {head_dim}"
                ),
            ));
        }
        expect_dims(op, "v_pages", v_pages, k_pages.dims())?;
        // The tensors exist, so the product cannot overflow usize.
        let num_slots = (num_blocks * block_size) as u64;
        Ok(Write {
            device,
            tokens,
            kv_heads,
            head_dim,
            num_slots,
        })
    }

    /// One block per token (grid-stride past the grid's limit), threads over the token's row.
    fn config(&self, tokens: u32) -> LaunchConfig {
        let row = self.kv_heads * self.head_dim;
        LaunchConfig {
            grid_dim: (tokens.min(i32::MAX as u32), 1, 1),
            block_dim: (row.next_multiple_of(32).clamp(32, 256) as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// rope_write_kv's grid: x over tokens, y over pieces of [`ROPE_THREADS`] elements of the
    /// token's longest row (its query row when `q_heads` query heads are rotated too), so that
    /// each thread rotates about one element of each row.
    fn rope_config(&self, tokens: u32, q_heads: usize) -> LaunchConfig {
        let row = self.kv_heads.max(q_heads) * self.head_dim;
        let pieces = row.div_ceil(ROPE_THREADS as usize).clamp(1, 65535) as u32;
        LaunchConfig {
            grid_dim: (tokens.min(i32::MAX as u32), pieces, 1),
            block_dim: (ROPE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}
