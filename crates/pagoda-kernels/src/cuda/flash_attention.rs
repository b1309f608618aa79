//! Flash attention for prefill (`kernels/flash_attention.cu`): every query row of a flat batch
//! attends to its sequence's keys in the paged KV cache, on tensor cores, with the scores kept on
//! chip (FlashAttention-2's forward pass). Query chunks see the context already in the pages, so
//! chunked prefill and prefix-cache hits need nothing special; grouped-query heads share every
//! K/V tile the kernel loads.
//!
//! f16 and bf16, head dimensions 64, 80, 96, 128 and 256 ([`supports`]); for anything else (f32,
//! other head sizes) [`super::paged_attention::paged_attention`] computes the same function. On
//! Hopper (an `sm_90a` build, [`sm90a_available`]) the head dimensions with a warpgroup-MMA tile
//! shape (128) use it; everywhere else the `mma.sync` kernel runs.

use pagoda_tensor::cudarc::driver::{LaunchConfig, PushKernelArg};
use pagoda_tensor::{CudaDevice, DType, Tensor};

use super::paged_attention::{DeviceBatchLayout, check_attention};
use super::registry::{KernelModule, Target, function};
use super::tensor_access::{
    alloc_output, allow_dynamic_shared_memory, arg_u32, device_view, into_tensor, kernel_name,
    launch_error,
};
use crate::cpu::attention::AttentionParams;
use crate::{Error, Result};

/// The dtypes the kernel is instantiated for: the tensor cores' 16-bit inputs.
const DTYPES: [DType; 2] = [DType::F16, DType::BF16];

/// How the kernel cuts the work: each thread block holds `block_m()` query rows (`warps` warps
/// of `16 * m_reps` rows) and walks the keys in tiles of `block_n`.
///
/// Every shape in [`TILE_SHAPES`] is compiled into the module; [`flash_attention_prefill`] uses
/// the first one listed for the head dimension that the device runs ([`default_tile_shape`]),
/// and [`flash_attention_prefill_with`] any of them (for benchmarks comparing them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TileShape {
    /// The head dimension the shape is compiled for.
    pub head_dim: usize,
    /// 16-row MMA blocks per warp: 2 halves the shared-memory reads per MMA, at the cost of
    /// twice the accumulator registers.
    pub m_reps: usize,
    /// Warps per thread block.
    pub warps: usize,
    /// Keys per K/V tile.
    pub block_n: usize,
    /// How a thread block orders its copies and MMAs.
    pub schedule: Schedule,
}

/// The order in which a thread block issues the copies of the next K/V tile and the MMAs of the
/// current one (flash_attention.cu's SCHEDULE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Schedule {
    /// The next tile's copies, then this tile's score MMAs, softmax and value MMAs.
    LoadsFirst,
    /// The next tile's block ids are read first, its copies issued after this tile's score MMAs,
    /// so that no warp waits on the block table before its MMAs start.
    LoadsLate,
    /// The next tile's score MMAs are also issued before this tile's softmax, so that the
    /// exponentials overlap them (two score tiles in registers).
    Pipelined,
    /// Warpgroup MMAs (sm_90a) from swizzled shared-memory tiles, each tile's score and value
    /// products issued and waited for in turn; `warps` is a multiple of 4 and `m_reps` 1.
    Wgmma,
}

impl Schedule {
    /// The suffix the kernel names of this schedule carry.
    fn suffix(self) -> &'static str {
        match self {
            Schedule::LoadsFirst => "",
            Schedule::LoadsLate => "l",
            Schedule::Pipelined => "p",
            Schedule::Wgmma => "g",
        }
    }

    /// Whether the schedule runs on warpgroup MMAs, which only an `sm_90a` build has.
    pub fn needs_sm90a(self) -> bool {
        matches!(self, Schedule::Wgmma)
    }
}

impl TileShape {
    /// Query rows per thread block.
    pub fn block_m(&self) -> usize {
        16 * self.m_reps * self.warps
    }

    /// Threads per block.
    pub fn threads(&self) -> usize {
        32 * self.warps
    }

    /// Dynamic shared memory per block: the Q tile and two stages of K and V tiles, as
    /// flash_attention.cu lays them out: each row padded by 8 elements (16 bytes) for `mma.sync`;
    /// unpadded and swizzled for wgmma, plus 1024 bytes to align the tiles to the swizzle's
    /// 1024-byte pattern.
    pub fn shared_bytes(&self) -> usize {
        let rows = self.block_m() + 4 * self.block_n;
        if self.schedule.needs_sm90a() {
            rows * self.head_dim * 2 + 1024
        } else {
            rows * (self.head_dim + 8) * 2
        }
    }

    /// The kernel's name without its dtype suffix, as PAGODA_FLASH_ATTENTION_SHAPE spells it.
    fn kernel_base(&self) -> String {
        format!(
            "flash_attention_d{}_m{}w{}n{}{}",
            self.head_dim,
            self.m_reps,
            self.warps,
            self.block_n,
            self.schedule.suffix()
        )
    }
}

const fn shape(
    head_dim: usize,
    m_reps: usize,
    warps: usize,
    block_n: usize,
    schedule: Schedule,
) -> TileShape {
    TileShape {
        head_dim,
        m_reps,
        warps,
        block_n,
        schedule,
    }
}

/// Every tile shape flash_attention.cu instantiates (its PAGODA_FLASH_ATTENTION_SHAPE lines),
/// for each head dimension the default first: the first wgmma shape where the device has
/// warpgroup MMAs, else the first `mma.sync` shape.
///
/// `mma.sync`: two blocks of 4 warps of 32 rows fit an SM (about 100 KB of shared memory and up
/// to 255 registers a thread each); at head_dim 256 the accumulators of 32 rows would not fit in
/// registers, so warps hold 16. The defaults are the fastest of each head dimension's shapes in
/// benches/cuda_flash_attention.rs on an H100 (f16, causal, 4096-token prompts): where the
/// schedules came within the run-to-run spread of 3% the plain one stays (64, 80, 128); the
/// pipelined schedule gained 7% at 96 in two runs, the late loads 9% at 256.
///
/// wgmma (head_dim 128 on sm_90a): two warpgroups of 64 rows and 64-key tiles, two blocks an SM.
/// On an H100 (f16, one job) it ran 452 TFLOP/s at B4 H32 S4096 causal against 295 for the
/// `mma.sync` default (465 against 320 non-causal, 464 against 317 at B1 S16384), ahead of
/// 128-key tiles (408, one block an SM) and of one warpgroup a block (370). The head_dim 64
/// shape is compiled and tested but not yet measured, so `mma.sync` stays the default there.
pub const TILE_SHAPES: &[TileShape] = &[
    shape(128, 1, 8, 64, Schedule::Wgmma),
    shape(64, 2, 4, 64, Schedule::LoadsFirst),
    shape(80, 2, 4, 64, Schedule::LoadsFirst),
    shape(96, 2, 4, 32, Schedule::Pipelined),
    shape(128, 2, 4, 64, Schedule::LoadsFirst),
    shape(256, 1, 4, 32, Schedule::LoadsLate),
    shape(64, 2, 4, 64, Schedule::LoadsLate),
    shape(80, 2, 4, 64, Schedule::LoadsLate),
    shape(96, 2, 4, 64, Schedule::LoadsFirst),
    shape(96, 2, 4, 64, Schedule::LoadsLate),
    shape(128, 2, 4, 64, Schedule::LoadsLate),
    shape(256, 1, 4, 32, Schedule::LoadsFirst),
    shape(256, 1, 4, 32, Schedule::Pipelined),
    shape(128, 1, 8, 128, Schedule::Wgmma),
    shape(128, 1, 4, 64, Schedule::Wgmma),
    shape(64, 1, 8, 64, Schedule::Wgmma),
];

/// The tile shape [`flash_attention_prefill`] uses for `head_dim`, if the kernel has one: the
/// first listed in [`TILE_SHAPES`] among those a device runs (all with `sm90a`, see
/// [`sm90a_available`]; else those without warpgroup MMAs).
pub fn default_tile_shape(head_dim: usize, sm90a: bool) -> Option<TileShape> {
    TILE_SHAPES
        .iter()
        .copied()
        .find(|s| s.head_dim == head_dim && (sm90a || !s.schedule.needs_sm90a()))
}

/// Whether the flash kernel handles `dtype` at `head_dim` (f16 or bf16; 64, 80, 96, 128 or 256).
pub fn supports(dtype: DType, head_dim: usize) -> bool {
    DTYPES.contains(&dtype) && default_tile_shape(head_dim, false).is_some()
}

/// Whether `device`'s kernels are built for `sm_90a` (a Hopper GPU of compute capability 9.0 and
/// an NVRTC that emits its machine code), which the wgmma tile shapes need.
pub fn sm90a_available(device: &CudaDevice) -> Result<bool> {
    Ok(Target::for_device(device)?.arch() == "sm_90a")
}

/// Attention of every query row of `q` (`[num_tokens, num_heads, head_dim]`, f16 or bf16) over
/// its sequence's keys in `k_pages` and `v_pages` (`[num_blocks, block_size, num_kv_heads,
/// head_dim]`, `q`'s dtype), laid out as `layout` says; returns `[num_tokens, num_heads,
/// head_dim]` in `q`'s dtype.
///
/// Causal, row `i` of a sequence sees positions `0..=context_len - query_len + i`, exactly as
/// [`super::paged_attention::paged_attention`] and the CPU oracle
/// [`crate::cpu::attention::paged_attention`]; non-causal, every row sees the sequence's whole
/// context (`0..context_len`), as an encoder or the non-causal benchmark shapes want.
///
/// The same argument checks as `paged_attention`, plus: the dtype must be f16 or bf16 (a
/// [`Error::DType`] otherwise), the head dimension one of [`supports`]' (an [`Error::Shape`]),
/// the scale positive and finite (an [`Error::InvalidParameter`]), and the tensors must start
/// at 16-byte boundaries (fresh or row-sliced tensors do).
pub fn flash_attention_prefill(
    q: &Tensor,
    layout: &DeviceBatchLayout,
    params: &AttentionParams,
    k_pages: &Tensor,
    v_pages: &Tensor,
    causal: bool,
) -> Result<Tensor> {
    launch(q, layout, params, k_pages, v_pages, causal, None)
}

/// [`flash_attention_prefill`] with a chosen tile shape, one of [`TILE_SHAPES`] for the head
/// dimension that the device runs (an [`Error::InvalidParameter`] otherwise).
pub fn flash_attention_prefill_with(
    q: &Tensor,
    layout: &DeviceBatchLayout,
    params: &AttentionParams,
    k_pages: &Tensor,
    v_pages: &Tensor,
    causal: bool,
    shape: TileShape,
) -> Result<Tensor> {
    launch(q, layout, params, k_pages, v_pages, causal, Some(shape))
}

/// Both entry points: `shape`, or the device's default for the head dimension.
fn launch(
    q: &Tensor,
    layout: &DeviceBatchLayout,
    params: &AttentionParams,
    k_pages: &Tensor,
    v_pages: &Tensor,
    causal: bool,
    shape: Option<TileShape>,
) -> Result<Tensor> {
    const OP: &str = "flash_attention_prefill";
    let device = check_attention(OP, q, layout, params, k_pages, v_pages, &DTYPES)?;
    let AttentionParams {
        num_heads,
        num_kv_heads,
        head_dim,
        scale,
    } = *params;
    let sm90a = sm90a_available(&device)?;
    let default =
        default_tile_shape(head_dim, sm90a).ok_or_else(|| unsupported_head_dim(params))?;
    let shape = shape.unwrap_or(default);
    if !TILE_SHAPES.contains(&shape) || shape.head_dim != head_dim {
        return Err(Error::InvalidParameter {
            op: OP,
            message: format!("{shape:?} is not a compiled tile shape for head_dim {head_dim}"),
        });
    }
    if shape.schedule.needs_sm90a() && !sm90a {
        return Err(Error::InvalidParameter {
            op: OP,
            message: format!(
                "{shape:?} needs warpgroup MMAs (an sm_90a build), which cuda:{} lacks",
                device.ordinal()
            ),
        });
    }
    // The kernel keeps the running max unscaled and scales it on use, which orders scores
    // correctly only for a positive scale.
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::InvalidParameter {
            op: OP,
            message: format!("the score scale must be positive and finite, got {scale}"),
        });
    }
    let num_tokens = layout.num_tokens();
    for (name, tensor) in [("q", q), ("k_pages", k_pages), ("v_pages", v_pages)] {
        // cp.async moves 16-byte chunks; a head is a whole number of them (head_dim % 8 == 0),
        // so only where a tensor starts within its allocation can break the alignment.
        if (tensor.layout().offset() * tensor.dtype().size_in_bytes()) % 16 != 0 {
            return Err(Error::shape(
                OP,
                format!("{name} must start at a 16-byte boundary of its storage"),
            ));
        }
    }

    let dims = [num_tokens, num_heads, head_dim];
    let mut out = alloc_output(OP, &device, q.dtype(), &dims)?;
    if num_tokens == 0 {
        return into_tensor(out, &dims);
    }
    let group = num_heads / num_kv_heads;
    // Packed rows (token, head of the group) are indexed with 32 bits in the kernel.
    let rows = num_tokens
        .checked_mul(group)
        .filter(|&r| r <= u32::MAX as usize)
        .ok_or_else(|| {
            Error::shape(
                OP,
                format!("{num_tokens} tokens x {group} heads per group exceed 32-bit indexing"),
            )
        })?;
    let total_tiles = rows / shape.block_m() + layout.num_seqs();
    let blocks = total_tiles
        .checked_mul(num_kv_heads)
        .filter(|&b| b <= i32::MAX as usize)
        .ok_or_else(|| {
            Error::shape(
                OP,
                format!("{total_tiles} tiles x {num_kv_heads} kv heads exceed the grid"),
            )
        })?;
    let block_size = arg_u32(OP, "block_size", layout.block_size())?;
    let block_divisor = FastDivisor::new(block_size)
        .ok_or_else(|| Error::shape(OP, "block_size must be positive"))?;
    let group_divisor = FastDivisor::new(arg_u32(OP, "heads per kv head", group)?)
        .ok_or_else(|| Error::shape(OP, "heads per kv head must be positive"))?;

    let name = kernel_name(OP, &shape.kernel_base(), q.dtype())?;
    let kernel = function(&device, KernelModule::FlashAttention, &name)?;
    let shared_bytes = shape.shared_bytes();
    allow_dynamic_shared_memory(OP, &device, &kernel, &name, shared_bytes)?;

    let args = [
        arg_u32(OP, "num_seqs", layout.num_seqs())?,
        arg_u32(OP, "max_blocks_per_seq", layout.max_blocks_per_seq())?,
        arg_u32(OP, "num_heads", num_heads)?,
        arg_u32(OP, "num_kv_heads", num_kv_heads)?,
        group_divisor.divisor,
        group_divisor.mul,
        group_divisor.shift,
        block_divisor.divisor,
        block_divisor.mul,
        block_divisor.shift,
        arg_u32(OP, "num_blocks", layout.num_blocks())?,
        arg_u32(OP, "total_tiles", total_tiles)?,
    ];
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let causal_arg = u32::from(causal);
    let (q_view, k_view, v_view) = (
        device_view(OP, "q", q)?,
        device_view(OP, "k_pages", k_pages)?,
        device_view(OP, "v_pages", v_pages)?,
    );
    let query_start = device_view(OP, "query_start", layout.query_start())?;
    let context_len = device_view(OP, "context_len", layout.context_len())?;
    let block_tables = device_view(OP, "block_tables", layout.block_tables())?;
    let config = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (shape.threads() as u32, 1, 1),
        shared_mem_bytes: shared_bytes as u32,
    };
    let mut launch = device.stream().launch_builder(&kernel);
    launch
        .arg(&q_view)
        .arg(&k_view)
        .arg(&v_view)
        .arg(out.slice_mut())
        .arg(&query_start)
        .arg(&context_len)
        .arg(&block_tables);
    for arg in &args {
        launch.arg(arg);
    }
    launch.arg(&scale_log2).arg(&causal_arg);
    // SAFETY: the arguments follow PAGODA_FLASH_ATTENTION's signature in flash_attention.cu (q,
    // k_pages, v_pages, out, query_start, context_len, block_tables, num_seqs, max_blocks,
    // num_heads, num_kv_heads, group, group_mul, group_shift, block_size, block_size_mul,
    // block_size_shift, num_blocks, total_tiles, scale_log2, causal). Every buffer has the shape checked above in the kernel
    // name's dtype and starts 16-byte aligned; the layout was validated against these pages when
    // it was built; the grid is total_tiles x num_kv_heads blocks of the shape's threads with
    // its shared memory, which the kernel was just allowed.
    unsafe { launch.launch(config) }.map_err(|e| launch_error(OP, &name, e))?;
    into_tensor(out, &dims)
}

fn unsupported_head_dim(params: &AttentionParams) -> Error {
    Error::shape(
        "flash_attention_prefill",
        format!(
            "head_dim {} has no flash-attention kernel (64, 80, 96, 128 and 256 do)",
            params.head_dim
        ),
    )
}

/// Division by a divisor fixed for a launch, as the kernel's FastDivisor does it: `n / d =
/// (umulhi(n, mul) + n) >> shift` with `shift = ceil(log2 d)` and `mul = floor(2^32 (2^shift - d)
/// / d) + 1` (Granlund and Montgomery, "Division by invariant integers using multiplication",
/// 1994), exact for every 32-bit `n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FastDivisor {
    divisor: u32,
    mul: u32,
    shift: u32,
}

impl FastDivisor {
    /// The constants for `divisor`, or `None` for 0.
    fn new(divisor: u32) -> Option<FastDivisor> {
        if divisor == 0 {
            return None;
        }
        let shift = 32 - (divisor - 1).leading_zeros();
        let d = u128::from(divisor);
        // Below 2^32: 2^shift < 2 d, so 2^32 (2^shift - d) / d < 2^32.
        let mul = ((1u128 << 32) * ((1u128 << shift) - d) / d + 1) as u32;
        Some(FastDivisor {
            divisor,
            mul,
            shift,
        })
    }

    /// `n / divisor`, computed the kernel's way.
    #[cfg(test)]
    fn div(&self, n: u32) -> u32 {
        let high = (u64::from(n) * u64::from(self.mul)) >> 32;
        ((high + u64::from(n)) >> self.shift) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_division_is_exact() {
        assert_eq!(FastDivisor::new(0), None);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            // xorshift64*: cheap, deterministic coverage of the 32-bit range.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
        };
        let divisors = (1..=300).chain([
            511,
            512,
            513,
            1000,
            4096,
            65535,
            65536,
            1 << 31,
            (1 << 31) + 1,
            u32::MAX,
        ]);
        for d in divisors {
            let fast = FastDivisor::new(d).unwrap();
            let edges = [0, 1, d - 1, d, d.wrapping_add(1), u32::MAX - 1, u32::MAX];
            for n in edges.into_iter().chain((0..200).map(|_| next())) {
                assert_eq!(fast.div(n), n / d, "{n} / {d}");
            }
        }
    }

    #[test]
    fn tile_shapes_are_the_instantiated_ones() {
        // Each `PAGODA_FLASH_ATTENTION_SHAPE(D, M_REPS, WARPS, BLOCK_N, SCHEDULE, SUFFIX, MIN)`
        // line of the source, as the kernel name it defines (without the dtype).
        let source = KernelModule::FlashAttention.source();
        let mut compiled: Vec<String> = source
            .lines()
            .filter_map(|line| line.strip_prefix("PAGODA_FLASH_ATTENTION_SHAPE("))
            .map(|args| {
                let args: Vec<&str> = args
                    .trim_end_matches(')')
                    .split(',')
                    .map(str::trim)
                    .collect();
                format!(
                    "flash_attention_d{}_m{}w{}n{}{}",
                    args[0], args[1], args[2], args[3], args[5]
                )
            })
            .collect();
        let mut listed: Vec<String> = TILE_SHAPES.iter().map(TileShape::kernel_base).collect();
        compiled.sort();
        listed.sort();
        assert_eq!(compiled, listed);
    }

    #[test]
    fn every_head_dim_has_a_default_and_shapes_fit() {
        for head_dim in [64, 80, 96, 128, 256] {
            for sm90a in [false, true] {
                let shape = default_tile_shape(head_dim, sm90a).unwrap();
                assert_eq!(shape.head_dim, head_dim);
                assert!(sm90a || !shape.schedule.needs_sm90a(), "{shape:?}");
            }
            assert!(supports(DType::F16, head_dim) && supports(DType::BF16, head_dim));
        }
        for head_dim in [0, 8, 32, 72, 112, 192, 512] {
            assert!(!supports(DType::F16, head_dim), "{head_dim}");
        }
        assert!(!supports(DType::F32, 128));
        for shape in TILE_SHAPES {
            // The kernel's static_asserts, restated: whole MMA tiles and even copy splits.
            assert!(
                shape.head_dim % 16 == 0 && shape.block_n % 16 == 0,
                "{shape:?}"
            );
            assert!(shape.threads() % shape.block_n == 0 || (shape.head_dim / 8) % 8 == 0);
            if shape.schedule.needs_sm90a() {
                // Whole warpgroups of 16-row warps; the wgmma N sizes instantiated; heads of
                // whole 64-column swizzle blocks.
                assert!(shape.m_reps == 1 && shape.warps % 4 == 0, "{shape:?}");
                assert!(matches!(shape.block_n, 64 | 128), "{shape:?}");
                assert!(shape.head_dim % 64 == 0, "{shape:?}");
            }
            // Within the 227 KB of shared memory a Hopper block may use.
            assert!(shape.shared_bytes() <= 227 * 1024, "{shape:?}");
        }
        assert_eq!(
            shape(128, 2, 4, 64, Schedule::LoadsFirst).shared_bytes(),
            (128 + 256) * 136 * 2,
            "Q tile + two stages of K and V"
        );
        assert_eq!(
            shape(128, 1, 8, 128, Schedule::Wgmma).shared_bytes(),
            (128 + 512) * 128 * 2 + 1024,
            "unpadded swizzled tiles, 1024-byte aligned"
        );
    }
}
