//! Launcher of `kernels/nf4.cu`: NF4 tensors ([`crate::cpu::nf4`]) on the device, decoded to
//! a dense tensor ([`dequantize`], bit for bit what bitsandbytes' `dequantize_4bit` gives), or
//! multiplied without leaving their packed form ([`linear`] and [`linear_into`], for up to
//! [`FUSED_MAX_ROWS`] rows of f16/bf16 activations, with [`crate::ops::Epilogue`] fused in: a
//! GEMV for one row, a persistent tiled kernel above, both on tensor cores).

use std::ops::Range;

use pagoda_tensor::cudarc::driver::{CudaViewMut, LaunchConfig, PushKernelArg};
use pagoda_tensor::{CudaDevice, DType, Device, Tensor};

use super::registry::{KernelModule, function};
use super::tensor_access::{
    FLOAT_DTYPES, alloc_output, arg_u32, common_device, device_view, device_view_mut, expect_dims,
    expect_dtype, expect_same_dtype, into_tensor, kernel_name, launch_error, multiprocessor_count,
};
use crate::cpu::nf4::{Nf4Blocks, Scales};
use crate::error::checked_product;
use crate::ops::{Epilogue, OutputActivation};
use crate::{Error, Result};

/// The most rows of activations [`linear`] takes; longer products decode the weights first
/// (see [`crate::ops::nf4_linear`]).
pub const FUSED_MAX_ROWS: usize = 64;

/// Most warps per block of the one-row GEMV (`NF4_GEMV_TILE_WARPS`, its launch bound), k values
/// per warp and group (`NF4_GEMV_GROUP`), and weight rows per block.
const GEMV_MAX_WARPS: usize = 8;
const GEMV_GROUP: usize = 512;
const GEMV_TILE_ROWS: usize = 16;
/// Groups a warp of the GEMV loads before it multiplies, at most (its kernels' `NB`).
const GEMV_MAX_BATCH: usize = 2;

/// Values per 64-value chunk of the product kernel, which needs whole chunks per row and at
/// most one block scale per chunk.
const CHUNK: usize = 64;
/// Weight rows per tile of the product, and output columns per tile of its gated form
/// (`NF4_ROWS` in nf4.cu).
const ROWS_PER_TILE: usize = 16;
/// Threads per block of the product (`NF4_WARPS` warps).
const LINEAR_THREADS: u32 = 256;
/// Blocks of the product per SM (`NF4_BLOCKS_PER_SM`): the most its registers (128 a thread,
/// its launch bound) and shared memory leave room for. Each block loops over tiles of rows.
const BLOCKS_PER_SM: usize = 2;
/// Threads per block, and values per thread, of the decoder.
const DEQUANT_THREADS: u32 = 256;
const DEQUANT_PER_THREAD: usize = 8;

/// The operation [`linear`] and [`linear_into`] report in errors.
const LINEAR_OP: &str = "nf4_linear";

/// `bias_kind` and `act` values of the product (as in gemv.cu).
const BIAS_NONE: i32 = 0;
const BIAS_F32: i32 = 1;
const BIAS_SAME: i32 = 2;

fn act_code(activation: OutputActivation) -> i32 {
    match activation {
        OutputActivation::Identity => 0,
        OutputActivation::Gelu => 1,
        OutputActivation::GeluTanh => 2,
        OutputActivation::SiluGate => 3,
    }
}

/// The second level of double-quantized scales on the device.
struct NestedOnDevice {
    code: Tensor,
    absmax: Tensor,
    offsets: Tensor,
    /// log2 of the NF4 blocks per group.
    shift: u32,
}

/// An NF4 tensor ([`Nf4Blocks`]) on one CUDA device: packed codes (U8), block scales (F32, or
/// U8 codes with their second level when double-quantized).
pub struct CudaNf4 {
    packed: Tensor,
    absmax: Tensor,
    nested: Option<NestedOnDevice>,
    len: usize,
    block_size: usize,
    storage_bytes: usize,
}

impl CudaNf4 {
    /// Copies `blocks` to `device`. The second level's groups must be a power of two of
    /// blocks (bitsandbytes always uses 256).
    pub fn new(blocks: &Nf4Blocks, device: &CudaDevice) -> Result<Self> {
        const OP: &str = "CudaNf4::new";
        let target = Device::Cuda(device.ordinal());
        let upload_u8 = |values: &[u8]| -> Result<Tensor> {
            Ok(Tensor::from_slice(values, [values.len()])?.to_device(&target)?)
        };
        let upload_f32 = |values: &[f32]| -> Result<Tensor> {
            Ok(Tensor::from_slice(values, [values.len()])?.to_device(&target)?)
        };
        let (absmax, nested) = match blocks.scales() {
            Scales::Absmax(absmax) => (upload_f32(absmax)?, None),
            Scales::Nested(n) => {
                if !n.block_size.is_power_of_two() {
                    return Err(Error::InvalidParameter {
                        op: OP,
                        message: format!(
                            "nested scale groups of {} blocks; the kernels take powers of two",
                            n.block_size
                        ),
                    });
                }
                let nested = NestedOnDevice {
                    code: upload_f32(&n.code)?,
                    absmax: upload_f32(&n.absmax)?,
                    offsets: upload_f32(&n.offsets)?,
                    shift: n.block_size.trailing_zeros(),
                };
                (upload_u8(&n.quantized)?, Some(nested))
            }
        };
        Ok(CudaNf4 {
            packed: upload_u8(blocks.packed())?,
            absmax,
            nested,
            len: blocks.len(),
            block_size: blocks.block_size(),
            storage_bytes: blocks.storage_bytes(),
        })
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Values per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Bytes of device memory the codes and scales take: what a product reads.
    pub fn storage_bytes(&self) -> usize {
        self.storage_bytes
    }

    /// The packed codes, U8.
    pub fn packed(&self) -> &Tensor {
        &self.packed
    }

    /// The device the tensor lives on.
    pub fn device(&self) -> Device {
        self.packed.device()
    }
}

/// The scale arguments every kernel of nf4.cu takes after the packed codes: `absmax, code2,
/// absmax2, offset2, nested, nested_shift, block_shift`. Pointers the kernel does not read
/// are passed as null.
struct ScaleArgs<'a> {
    absmax: pagoda_tensor::cudarc::driver::CudaView<'a, u8>,
    nested: Option<[pagoda_tensor::cudarc::driver::CudaView<'a, u8>; 3]>,
    nested_flag: i32,
    nested_shift: u32,
    block_shift: u32,
}

impl<'a> ScaleArgs<'a> {
    fn of(op: &'static str, w: &'a CudaNf4) -> Result<Self> {
        let nested = w
            .nested
            .as_ref()
            .map(|n| -> Result<_> {
                Ok([
                    device_view(op, "nested code", &n.code)?,
                    device_view(op, "nested absmax", &n.absmax)?,
                    device_view(op, "nested offsets", &n.offsets)?,
                ])
            })
            .transpose()?;
        Ok(ScaleArgs {
            absmax: device_view(op, "absmax", &w.absmax)?,
            nested_flag: i32::from(nested.is_some()),
            nested_shift: w.nested.as_ref().map_or(0, |n| n.shift),
            nested,
            block_shift: w.block_size.trailing_zeros(),
        })
    }

    fn push<'b>(
        &'b self,
        launch: &mut pagoda_tensor::cudarc::driver::LaunchArgs<'b>,
        null: &'b u64,
    ) {
        launch.arg(&self.absmax);
        match &self.nested {
            Some([code, absmax, offsets]) => launch.arg(code).arg(absmax).arg(offsets),
            None => launch.arg(null).arg(null).arg(null),
        };
        launch
            .arg(&self.nested_flag)
            .arg(&self.nested_shift)
            .arg(&self.block_shift);
    }
}

/// Elements `start .. start + product(dims)` of `w`, decoded to `dtype` (f32, f16 or bf16) as
/// a contiguous tensor of shape `dims` on `w`'s device: `CODE[q] * absmax` in f32, rounded
/// once, as bitsandbytes' `dequantize_4bit` does.
pub fn dequantize(w: &CudaNf4, start: usize, dims: &[usize], dtype: DType) -> Result<Tensor> {
    const OP: &str = "nf4_dequantize";
    let count = checked_product(OP, dims)?;
    if start.checked_add(count).is_none_or(|end| end > w.len) {
        return Err(Error::shape(
            OP,
            format!(
                "elements {start}..{} of a tensor of {}",
                start.saturating_add(count),
                w.len
            ),
        ));
    }
    let device = common_device(OP, &[("packed", &w.packed)])?;
    let name = kernel_name(OP, "nf4_dequantize", dtype)?;
    let mut out = alloc_output(OP, &device, dtype, dims)?;
    if count == 0 {
        return into_tensor(out, dims);
    }
    let kernel = function(&device, KernelModule::Nf4, &name)?;
    let per_block = DEQUANT_THREADS as usize * DEQUANT_PER_THREAD;
    let config = LaunchConfig {
        grid_dim: (
            arg_u32(OP, "blocks", count.div_ceil(per_block).min(1 << 20))?,
            1,
            1,
        ),
        block_dim: (DEQUANT_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let packed = device_view(OP, "packed", &w.packed)?;
    let scales = ScaleArgs::of(OP, w)?;
    let (start_arg, count_arg) = (start as u64, count as u64);
    let null = 0u64;
    let stream = device.stream();
    let mut launch = stream.launch_builder(&kernel);
    launch.arg(&packed);
    scales.push(&mut launch, &null);
    launch.arg(&start_arg).arg(&count_arg).arg(out.slice_mut());
    // SAFETY: the arguments follow nf4_dequantize's signature (packed, absmax, code2, absmax2,
    // offset2, nested, nested_shift, block_shift, start, count, out); packed holds len / 2
    // rounded up bytes and the scales one entry per block (and per group when nested, with a
    // 256-entry code), as `CudaNf4::new` checked through `Nf4Blocks`; the kernel reads elements
    // start .. start + count < len and writes `count` elements of `dtype` into `out`.
    unsafe { launch.launch(config) }.map_err(|e| launch_error(OP, &name, e))?;
    into_tensor(out, dims)
}

/// Whether [`linear`] multiplies `m` rows of `dtype` activations by rows of `k` values of an
/// NF4 tensor with blocks of `block_size` without decoding it first: f16 or bf16, 1..=64 rows,
/// `k` a positive multiple of 64 and blocks of at least 64 values.
pub fn fused_linear_supported(dtype: DType, m: usize, k: usize, block_size: usize) -> bool {
    matches!(dtype, DType::F16 | DType::BF16)
        && (1..=FUSED_MAX_ROWS).contains(&m)
        && k > 0
        && k.is_multiple_of(CHUNK)
        && block_size >= CHUNK
}

/// `epilogue(x [.., k] · w[rows]ᵀ + bias)` where `w` is viewed as `[len / k, k]` and `rows`
/// picks consecutive weight rows, in one kernel that reads each packed weight once and
/// multiplies on tensor cores (code values rounded to x's dtype, exact products, f32
/// accumulation and scaling): for one row of x a GEMV whose blocks each take 16 weight rows,
/// its warps splitting k with all of a warp's loads in flight before it multiplies, above that
/// a persistent kernel looping over tiles of rows.
///
/// The output has x's leading dimensions and `rows.len()` columns, or half as many with
/// [`OutputActivation::SiluGate`], where `rows` holds the gate rows then as many up rows. The
/// bias (f32 or x's dtype) has one entry per row of `rows`; an addend has the output's shape
/// and dtype. [`fused_linear_supported`] must hold.
pub fn linear(
    x: &Tensor,
    w: &CudaNf4,
    k: usize,
    rows: Range<usize>,
    bias: Option<&Tensor>,
    epilogue: Epilogue<'_>,
) -> Result<Tensor> {
    let product = Product::check(x, w, k, rows, bias, epilogue)?;
    let mut out = alloc_output(LINEAR_OP, &product.device, product.dtype, &product.dims)?;
    product.launch(&mut out.slice_mut().as_view_mut())?;
    into_tensor(out, &product.dims)
}

/// [`linear`] into `out`, a contiguous tensor of the output's shape and dtype on the same device
/// that no other tensor shares (for callers that keep their outputs, such as a recorded decode
/// step, and for timing the kernel without the output's allocation).
pub fn linear_into(
    x: &Tensor,
    w: &CudaNf4,
    k: usize,
    rows: Range<usize>,
    bias: Option<&Tensor>,
    epilogue: Epilogue<'_>,
    out: &mut Tensor,
) -> Result<()> {
    let product = Product::check(x, w, k, rows, bias, epilogue)?;
    common_device(LINEAR_OP, &[("x", x), ("out", out)])?;
    expect_same_dtype(LINEAR_OP, "out", out, "x", product.dtype)?;
    expect_dims(LINEAR_OP, "out", out, &product.dims)?;
    let mut view = device_view_mut(LINEAR_OP, "out", out)?;
    product.launch(&mut view)
}

/// The checked operands of one product.
struct Product<'a> {
    x: &'a Tensor,
    w: &'a CudaNf4,
    bias: Option<&'a Tensor>,
    addend: Option<&'a Tensor>,
    device: CudaDevice,
    dtype: DType,
    /// Output dimensions: x's leading ones, then n.
    dims: Vec<usize>,
    m: usize,
    n: usize,
    k: usize,
    first_row: usize,
    bias_kind: i32,
    activation: OutputActivation,
}

impl<'a> Product<'a> {
    fn check(
        x: &'a Tensor,
        w: &'a CudaNf4,
        k: usize,
        rows: Range<usize>,
        bias: Option<&'a Tensor>,
        epilogue: Epilogue<'a>,
    ) -> Result<Self> {
        let mut tensors = vec![("x", x), ("packed", &w.packed)];
        tensors.extend(bias.map(|b| ("bias", b)));
        tensors.extend(epilogue.addend.map(|a| ("addend", a)));
        let device = common_device(LINEAR_OP, &tensors)?;
        expect_dtype(LINEAR_OP, "x", x, &FLOAT_DTYPES)?;
        let dtype = x.dtype();
        let Some((&x_k, outer)) = x.dims().split_last() else {
            return Err(Error::shape(
                LINEAR_OP,
                "x must have at least one dimension",
            ));
        };
        let m: usize = outer.iter().product();
        if x_k != k || !fused_linear_supported(dtype, m, k, w.block_size) {
            return Err(Error::shape(
                LINEAR_OP,
                format!(
                    "takes 1..={FUSED_MAX_ROWS} rows of f16/bf16 with k a multiple of {CHUNK} and \
                     blocks of at least {CHUNK}; got x {:?} {dtype}, k = {k}, blocks of {}",
                    x.dims(),
                    w.block_size
                ),
            ));
        }
        if rows.is_empty() || rows.end > w.len / k {
            return Err(Error::shape(
                LINEAR_OP,
                format!("weight rows {rows:?} of a [{}, {k}] tensor", w.len / k),
            ));
        }
        let gated = epilogue.activation == OutputActivation::SiluGate;
        if gated && !rows.len().is_multiple_of(2) {
            return Err(Error::shape(
                LINEAR_OP,
                format!(
                    "a gated product needs gate and up rows in equal number, got {}",
                    rows.len()
                ),
            ));
        }
        let n = if gated { rows.len() / 2 } else { rows.len() };
        let mut dims = outer.to_vec();
        dims.push(n);
        let bias_kind = match bias {
            None => BIAS_NONE,
            Some(bias) => {
                expect_dtype(LINEAR_OP, "bias", bias, &[dtype, DType::F32])?;
                expect_dims(LINEAR_OP, "bias", bias, &[rows.len()])?;
                if bias.dtype() == DType::F32 {
                    BIAS_F32
                } else {
                    BIAS_SAME
                }
            }
        };
        if let Some(addend) = epilogue.addend {
            expect_same_dtype(LINEAR_OP, "addend", addend, "x", dtype)?;
            expect_dims(LINEAR_OP, "addend", addend, &dims)?;
        }
        // The kernels read x in 16-byte pieces.
        if !(x.layout().offset() * dtype.size_in_bytes()).is_multiple_of(16) {
            return Err(Error::shape(LINEAR_OP, "x must start 16-byte aligned"));
        }
        Ok(Product {
            x,
            w,
            bias,
            addend: epilogue.addend,
            device,
            dtype,
            dims,
            m,
            n,
            k,
            first_row: rows.start,
            bias_kind,
            activation: epilogue.activation,
        })
    }

    /// The kernel and launch configuration for this product.
    fn kernel(&self) -> Result<(String, LaunchConfig)> {
        let suffix = if self.dtype == DType::F16 {
            "f16"
        } else {
            "bf16"
        };
        let gated = self.activation == OutputActivation::SiluGate;
        let (m, n, k) = (self.m, self.n, self.k);
        if m == 1 {
            // One block per tile of 16 weight rows (gated: 8 gate rows and their up rows); its
            // warps split k in groups of 512 as evenly as the most warps allow, each loading up
            // to two groups before it multiplies.
            let outputs_per_tile = if gated {
                GEMV_TILE_ROWS / 2
            } else {
                GEMV_TILE_ROWS
            };
            let groups = k.div_ceil(GEMV_GROUP);
            let per_warp = groups.div_ceil(GEMV_MAX_WARPS);
            let warps = groups.div_ceil(per_warp);
            let batch = per_warp.min(GEMV_MAX_BATCH);
            let config = LaunchConfig {
                grid_dim: (
                    arg_u32(LINEAR_OP, "blocks", n.div_ceil(outputs_per_tile))?,
                    1,
                    1,
                ),
                block_dim: (arg_u32(LINEAR_OP, "threads", 32 * warps)?, 1, 1),
                shared_mem_bytes: 0,
            };
            return Ok((format!("nf4_gemv_{suffix}_m1_g{batch}"), config));
        }
        let n_tiles = m.div_ceil(8).next_power_of_two();
        let outputs_per_tile = if gated {
            ROWS_PER_TILE / 2
        } else {
            ROWS_PER_TILE
        };
        let row_tiles = n.div_ceil(outputs_per_tile);
        let sms = multiprocessor_count(LINEAR_OP, &self.device)?;
        let blocks = row_tiles.min(sms * BLOCKS_PER_SM);
        let config = LaunchConfig {
            grid_dim: (arg_u32(LINEAR_OP, "blocks", blocks)?, 1, 1),
            block_dim: (LINEAR_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        Ok((format!("nf4_linear_{suffix}_m{n_tiles}"), config))
    }

    /// Runs the product into `out` (m x n elements of the product's dtype).
    fn launch(&self, out: &mut CudaViewMut<'_, u8>) -> Result<()> {
        let (name, config) = self.kernel()?;
        let kernel = function(&self.device, KernelModule::Nf4, &name)?;
        let gemv = name.starts_with("nf4_gemv");
        let (row_begin, m_arg, n_arg, k_arg) = (
            arg_u32(LINEAR_OP, "first row", self.first_row)?,
            arg_u32(LINEAR_OP, "m", self.m)?,
            arg_u32(LINEAR_OP, "n", self.n)?,
            arg_u32(LINEAR_OP, "k", self.k)?,
        );
        let x_view = device_view(LINEAR_OP, "x", self.x)?;
        let packed = device_view(LINEAR_OP, "packed", &self.w.packed)?;
        let scales = ScaleArgs::of(LINEAR_OP, self.w)?;
        let bias_view = self
            .bias
            .map(|b| device_view(LINEAR_OP, "bias", b))
            .transpose()?;
        let addend_view = self
            .addend
            .map(|a| device_view(LINEAR_OP, "addend", a))
            .transpose()?;
        let act = act_code(self.activation);
        let null = 0u64;
        let stream = self.device.stream();
        let mut launch = stream.launch_builder(&kernel);
        launch.arg(&x_view).arg(&packed);
        scales.push(&mut launch, &null);
        launch.arg(&row_begin);
        match bias_view.as_ref() {
            Some(bias) => launch.arg(bias),
            None => launch.arg(&null),
        };
        launch.arg(&self.bias_kind);
        match addend_view.as_ref() {
            Some(addend) => launch.arg(addend),
            None => launch.arg(&null),
        };
        launch.arg(&act).arg(out);
        // The GEMV takes one row of x, named in the kernel.
        if !gemv {
            launch.arg(&m_arg);
        }
        launch.arg(&n_arg).arg(&k_arg);
        // SAFETY: the arguments follow nf4_linear_*'s signature (x, packed, absmax, code2, absmax2,
        // offset2, nested, nested_shift, block_shift, row_begin, bias, bias_kind, addend, act, out,
        // m, n, k), or nf4_gemv_*'s, the same without m; x holds m x k elements of `dtype` starting
        // 16-byte aligned, k is a multiple of 64 so every weight row starts 32-byte aligned in
        // `packed`, the weight rows read (row_begin .. row_begin + n, or + 2n when gated) lie
        // inside the tensor, the scales cover its blocks (checked by `Nf4Blocks`), the bias holds
        // one entry per row read of the kind bias_kind names (or is null and unread), the addend
        // (or null) and out hold m x n elements of `dtype`. nf4_linear_* gets at most one block of
        // 256 threads (its launch bound) per tile of 16 outputs (gated: 8), each block looping
        // over its tiles, and m <= 8 * n_tiles, its row capacity; the GEMV one block of
        // 32..=256 threads (its launch bound) per tile of 16 outputs (gated: 8), its batch of
        // groups in its name.
        unsafe { launch.launch(config) }.map_err(|e| launch_error(LINEAR_OP, &name, e))?;
        Ok(())
    }
}
