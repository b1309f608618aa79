//! Tensor-level ops: what the models call. Each one checks where its tensors live and runs the
//! CPU implementation (f32 activations) or the CUDA launcher (f16, bf16 or f32).

use pagoda_tensor::{CudaDevice, DType, Device, Tensor};

use crate::cpu::attention::{AttentionParams, SequenceSpan};
use crate::cpu::gemm::Weights;
use crate::cpu::kv_write::PageGeometry;
use crate::cpu::rope::RopeTable;
use crate::profile::OpTimer;
use crate::{Error, Result, cpu, cuda};

/// `x · wᵀ (+ bias)` with `w` stored `[n, k]`, as in `nn.Linear`; `x` is `[m, k]`.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let _timer = OpTimer::start("linear", x.device());
    match x.device() {
        Device::Cpu => {
            let [m, k] = dims2("linear", x)?;
            let n = w.dims()[0];
            let mut out = vec![0.0; m * n];
            let bias = bias.map(Tensor::as_slice::<f32>).transpose()?;
            cpu::gemm::linear(x.as_slice()?, m, k, weights(w)?, n, bias, &mut out)?;
            Ok(Tensor::from_vec(out, [m, n])?)
        }
        Device::Cuda(_) => cuda::gemm::linear(x, w, bias),
    }
}

/// The elementwise step that follows a linear layer, applied by [`linear_with_epilogue`]:
/// `activation(x Wᵀ + b) + addend`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Epilogue<'a> {
    pub activation: OutputActivation,
    /// Added last (e.g. the attention output a parallel-residual block adds to the MLP's); it has
    /// the output's shape and dtype.
    pub addend: Option<&'a Tensor>,
}

/// The activation of an [`Epilogue`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputActivation {
    #[default]
    Identity,
    /// Exact GELU.
    Gelu,
    /// GELU with the tanh approximation.
    GeluTanh,
    /// SwiGLU: the weight stacks `n` gate rows over `n` up rows (and the bias likewise), and
    /// the output's `n` columns are `silu(gate) * up`.
    SiluGate,
}

/// `linear(x, w, bias)` followed by `epilogue`. On a GPU, decode-sized products (at most
/// [`cuda::gemm::DECODE_MAX_ROWS`] rows) run it as one kernel, the elementwise step applied
/// to each output before it is stored; otherwise the product and the step run one after the
/// other, as on the CPU.
pub fn linear_with_epilogue(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    epilogue: Epilogue<'_>,
) -> Result<Tensor> {
    let rows = x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
    if matches!(x.device(), Device::Cuda(_)) && (1..=cuda::gemm::DECODE_MAX_ROWS).contains(&rows) {
        let _timer = OpTimer::start("linear", x.device());
        return cuda::gemm::linear_with_epilogue(x, w, bias, epilogue);
    }
    let out = match epilogue.activation {
        OutputActivation::Identity => linear(x, w, bias)?,
        OutputActivation::Gelu => gelu(&linear(x, w, bias)?, false)?,
        OutputActivation::GeluTanh => gelu(&linear(x, w, bias)?, true)?,
        OutputActivation::SiluGate => {
            let n = w.dims().first().copied().unwrap_or(0);
            if n % 2 != 0 {
                return Err(Error::Shape {
                    op: "linear_with_epilogue",
                    message: format!(
                        "a gated product needs gate and up rows in equal number, w has {n}"
                    ),
                });
            }
            let half = |start: usize| -> Result<(Tensor, Option<Tensor>)> {
                Ok((
                    w.narrow(0, start, n / 2)?,
                    bias.map(|b| b.narrow(0, start, n / 2)).transpose()?,
                ))
            };
            let ((gate_w, gate_b), (up_w, up_b)) = (half(0)?, half(n / 2)?);
            silu_and_mul(
                &linear(x, &gate_w, gate_b.as_ref())?,
                &linear(x, &up_w, up_b.as_ref())?,
            )?
        }
    };
    match epilogue.addend {
        Some(addend) => add(&out, addend),
        None => Ok(out),
    }
}

/// `x · wᵀ + bias + x2 · w2ᵀ + bias2 + addend`: two products into the same outputs (`w` `[n, k]`,
/// `w2` `[n, k2]`, `x` `[.., k]` and `x2` `[.., k2]` with the same leading dimensions). On a
/// GPU, decode-sized products (at most [`cuda::gemm::DECODE_MAX_ROWS`] rows) run as one
/// kernel that reads both weights in one pass; otherwise as two products, the second adding
/// the first.
pub fn linear_pair(
    (x, w, bias): (&Tensor, &Tensor, Option<&Tensor>),
    (x2, w2, bias2): (&Tensor, &Tensor, Option<&Tensor>),
    addend: Option<&Tensor>,
) -> Result<Tensor> {
    let rows = x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
    if matches!(x.device(), Device::Cuda(_)) && (1..=cuda::gemm::DECODE_MAX_ROWS).contains(&rows) {
        let _timer = OpTimer::start("linear", x.device());
        return cuda::gemm::linear_pair((x, w, bias), (x2, w2, bias2), addend);
    }
    let first = linear(x, w, bias)?;
    let first = match addend {
        Some(addend) => add(&first, addend)?,
        None => first,
    };
    linear_with_epilogue(
        x2,
        w2,
        bias2,
        Epilogue {
            activation: OutputActivation::Identity,
            addend: Some(&first),
        },
    )
}

/// One product of [`linear_side_by_side`]: `epilogue(x · wᵀ + bias)`.
pub use crate::cuda::gemm::LinearJob;

/// Two independent products, each `epilogue(x · wᵀ + bias)` as [`linear_with_epilogue`]
/// computes it. On a GPU, when both are decode-sized (at most
/// [`cuda::gemm::DECODE_MAX_ROWS`] rows), they run in one kernel launch, so the GPU ramps up
/// and drains once for both; otherwise one after the other.
pub fn linear_side_by_side(a: LinearJob<'_>, b: LinearJob<'_>) -> Result<(Tensor, Tensor)> {
    let rows = |x: &Tensor| x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
    let decode = |x: &Tensor| (1..=cuda::gemm::DECODE_MAX_ROWS).contains(&rows(x));
    if matches!(a.x.device(), Device::Cuda(_)) && decode(a.x) && decode(b.x) {
        let _timer = OpTimer::start("linear", a.x.device());
        return cuda::gemm::linear_side_by_side(a, b);
    }
    Ok((
        linear_with_epilogue(a.x, a.w, a.bias, a.epilogue)?,
        linear_with_epilogue(b.x, b.w, b.bias, b.epilogue)?,
    ))
}

/// Rows `ids` (U32) of `table` `[rows, hidden]`: token embeddings, or any row gather.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let _timer = OpTimer::start("embedding", table.device());
    match table.device() {
        Device::Cpu => {
            let [_, hidden] = dims2("embedding", table)?;
            let ids = ids.as_slice::<u32>()?;
            let mut out = vec![0.0; ids.len() * hidden];
            cpu::embedding::embedding(weights(table)?, hidden, ids, &mut out)?;
            Ok(Tensor::from_vec(out, [ids.len(), hidden])?)
        }
        Device::Cuda(_) => cuda::embedding::embedding(table, ids),
    }
}

/// A norm layer's parameters: RMSNorm when `bias` is `None`, LayerNorm otherwise.
pub struct NormWeights<'a> {
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub eps: f32,
}

/// The norm of each row of `x` `[rows, hidden]`.
pub fn norm(x: &Tensor, p: &NormWeights<'_>) -> Result<Tensor> {
    let _timer = OpTimer::start("norm", x.device());
    match x.device() {
        Device::Cpu => {
            let [_, hidden] = dims2("norm", x)?;
            let mut out = vec![0.0; x.elem_count()];
            cpu_norm(x.as_slice()?, hidden, p, &mut out)?;
            Ok(Tensor::from_vec(out, x.dims().to_vec())?)
        }
        Device::Cuda(_) => match p.bias {
            Some(bias) => cuda::norm::layer_norm(x, p.weight, bias, p.eps),
            None => cuda::norm::rms_norm(x, p.weight, p.eps),
        },
    }
}

/// `residual += x`, then the norm of the new residual: the step between two sublayers of a
/// pre-norm transformer, in one pass over the data.
pub fn add_norm(x: &Tensor, residual: &mut Tensor, p: &NormWeights<'_>) -> Result<Tensor> {
    let _timer = OpTimer::start("add_norm", x.device());
    match x.device() {
        Device::Cpu => {
            let [_, hidden] = dims2("add_norm", x)?;
            let sum = residual.as_mut_slice::<f32>()?;
            let x = x.as_slice::<f32>()?;
            if x.len() != sum.len() {
                return Err(Error::Shape {
                    op: "add_norm",
                    message: format!("x has {} values, the residual {}", x.len(), sum.len()),
                });
            }
            sum.iter_mut().zip(x).for_each(|(r, v)| *r += v);
            let mut out = vec![0.0; sum.len()];
            cpu_norm(sum, hidden, p, &mut out)?;
            Ok(Tensor::from_vec(out, residual.dims().to_vec())?)
        }
        Device::Cuda(_) => match p.bias {
            Some(bias) => cuda::norm::add_layer_norm(x, residual, p.weight, bias, p.eps),
            None => cuda::norm::add_rms_norm(x, residual, p.weight, p.eps),
        },
    }
}

/// `residual += x`, then two norms of the new residual (LayerNorms, or RMSNorms, with the same
/// eps): a parallel-residual block's attention and MLP inputs. One pass on the GPU for
/// LayerNorm; otherwise [`add_norm`] and [`norm`].
pub fn add_norm_dual(
    x: &Tensor,
    residual: &mut Tensor,
    first: &NormWeights<'_>,
    second: &NormWeights<'_>,
) -> Result<(Tensor, Tensor)> {
    if let (Device::Cuda(_), Some(bias), Some(bias2)) = (x.device(), first.bias, second.bias)
        && first.eps == second.eps
    {
        let _timer = OpTimer::start("add_norm", x.device());
        return cuda::norm::add_layer_norm_dual(
            x,
            residual,
            (first.weight, bias),
            (second.weight, bias2),
            first.eps,
        );
    }
    let out = add_norm(x, residual, first)?;
    Ok((out, norm(residual, second)?))
}

fn cpu_norm(x: &[f32], hidden: usize, p: &NormWeights<'_>, out: &mut [f32]) -> Result<()> {
    let weight = p.weight.as_slice()?;
    match p.bias {
        Some(bias) => cpu::norm::layer_norm(x, hidden, weight, bias.as_slice()?, p.eps, out),
        None => cpu::norm::rms_norm(x, hidden, weight, p.eps, out),
    }
}

/// `a + b`, elementwise.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let _timer = OpTimer::start("add", a.device());
    match a.device() {
        Device::Cpu => {
            let (x, y) = (a.as_slice::<f32>()?, b.as_slice::<f32>()?);
            if x.len() != y.len() {
                return Err(Error::Shape {
                    op: "add",
                    message: format!("{:?} + {:?}", a.dims(), b.dims()),
                });
            }
            let sum = x.iter().zip(y).map(|(x, y)| x + y).collect();
            Ok(Tensor::from_vec(sum, a.dims().to_vec())?)
        }
        Device::Cuda(_) => cuda::activation::add(a, b),
    }
}

/// GELU, exact (erf) or with the tanh approximation.
pub fn gelu(x: &Tensor, tanh_approximation: bool) -> Result<Tensor> {
    let _timer = OpTimer::start("gelu", x.device());
    match x.device() {
        Device::Cpu => {
            let mut out = x.as_slice::<f32>()?.to_vec();
            if tanh_approximation {
                cpu::activation::gelu_tanh(&mut out);
            } else {
                cpu::activation::gelu_exact(&mut out);
            }
            Ok(Tensor::from_vec(out, x.dims().to_vec())?)
        }
        Device::Cuda(_) => cuda::activation::gelu(x, tanh_approximation),
    }
}

/// `silu(gate) * up`, the SwiGLU gate.
pub fn silu_and_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let _timer = OpTimer::start("silu_and_mul", gate.device());
    match gate.device() {
        Device::Cpu => {
            let mut out = vec![0.0; gate.elem_count()];
            cpu::activation::silu_and_mul(gate.as_slice()?, up.as_slice()?, &mut out)?;
            Ok(Tensor::from_vec(out, gate.dims().to_vec())?)
        }
        Device::Cuda(_) => cuda::activation::silu_and_mul(gate, up),
    }
}

/// A RoPE cos/sin table, with its copy on the device the model runs on.
pub struct Rope {
    table: RopeTable,
    cuda: Option<cuda::rope::CudaRopeTable>,
}

impl Rope {
    pub fn new(table: RopeTable, device: &Device) -> Result<Self> {
        let cuda = match device {
            Device::Cpu => None,
            Device::Cuda(ordinal) => Some(cuda::rope::CudaRopeTable::new(
                &table,
                &CudaDevice::get(*ordinal)?,
            )?),
        };
        Ok(Self { table, cuda })
    }

    pub fn table(&self) -> &RopeTable {
        &self.table
    }

    fn cuda(&self, op: &'static str) -> Result<&cuda::rope::CudaRopeTable> {
        self.cuda.as_ref().ok_or_else(|| Error::Device {
            op,
            message: "the RoPE table was built for the CPU, the tensors are on a GPU".into(),
        })
    }
}

/// Rotates `x` `[tokens, heads, head_dim]` in place at each token's position (U32 `[tokens]`).
pub fn apply_rope(x: &mut Tensor, positions: &Tensor, rope: &Rope) -> Result<()> {
    let _timer = OpTimer::start("apply_rope", x.device());
    match x.device() {
        Device::Cpu => {
            let [_, heads, head_dim] = dims3("apply_rope", x)?;
            let positions = positions.as_slice::<u32>()?;
            cpu::rope::apply_rope(x.as_mut_slice()?, heads, head_dim, positions, &rope.table)
        }
        Device::Cuda(_) => cuda::rope::apply_rope(x, positions, rope.cuda("apply_rope")?),
    }
}

/// The paged KV pages of one layer, `[num_blocks, block_size, kv_heads, head_dim]` each.
pub struct LayerKv<'a> {
    pub k_pages: &'a mut Tensor,
    pub v_pages: &'a mut Tensor,
}

fn page_geometry(pages: &Tensor) -> Result<PageGeometry> {
    match *pages.dims() {
        [num_blocks, block_size, num_kv_heads, head_dim] => Ok(PageGeometry {
            num_blocks,
            block_size,
            num_kv_heads,
            head_dim,
        }),
        _ => Err(Error::Shape {
            op: "kv pages",
            message: format!("pages must be 4-D, got {:?}", pages.dims()),
        }),
    }
}

/// Writes the new tokens' K (rotated by RoPE on the way) and V `[tokens, kv_heads, head_dim]`
/// into their slots (U32 `[tokens]`) of the pages: RoPE on K and the page write are one kernel on
/// the GPU.
pub fn rope_write_kv(
    k: &Tensor,
    v: &Tensor,
    positions: &Tensor,
    slots: &Tensor,
    rope: &Rope,
    kv: LayerKv<'_>,
) -> Result<()> {
    let _timer = OpTimer::start("rope_write_kv", k.device());
    match k.device() {
        Device::Cpu => {
            let geometry = page_geometry(kv.k_pages)?;
            let mut rotated = k.as_slice::<f32>()?.to_vec();
            let positions = positions.as_slice::<u32>()?;
            cpu::rope::apply_rope(
                &mut rotated,
                geometry.num_kv_heads,
                geometry.head_dim,
                positions,
                &rope.table,
            )?;
            cpu::kv_write::write_kv(
                &rotated,
                v.as_slice()?,
                slots.as_slice()?,
                &geometry,
                kv.k_pages.as_mut_slice()?,
                kv.v_pages.as_mut_slice()?,
            )
        }
        Device::Cuda(_) => cuda::kv_write::rope_write_kv(
            k,
            v,
            positions,
            slots,
            rope.cuda("rope_write_kv")?,
            kv.k_pages,
            kv.v_pages,
        ),
    }
}

/// [`rope_write_kv`], and the queries `q` `[tokens, heads, head_dim]` rotated the same way,
/// returned as a new tensor: on the GPU all of an attention layer's RoPE and its page write are
/// one kernel.
pub fn rope_qk_write_kv(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    positions: &Tensor,
    slots: &Tensor,
    rope: &Rope,
    kv: LayerKv<'_>,
) -> Result<Tensor> {
    match q.device() {
        Device::Cpu => {
            rope_write_kv(k, v, positions, slots, rope, kv)?;
            // A copy of its own: q may share its storage with k and v (views of one product).
            let mut rotated = Tensor::from_vec(q.to_vec_f32()?, q.dims().to_vec())?;
            apply_rope(&mut rotated, positions, rope)?;
            Ok(rotated)
        }
        Device::Cuda(_) => {
            let _timer = OpTimer::start("rope_write_kv", q.device());
            cuda::kv_write::rope_qk_write_kv(
                q,
                k,
                v,
                positions,
                slots,
                rope.cuda("rope_qk_write_kv")?,
                kv.k_pages,
                kv.v_pages,
            )
        }
    }
}

/// One sequence's rows of a flat batch and the blocks holding its context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SequenceRows {
    pub query_start: usize,
    pub query_len: usize,
    /// Tokens in the pages for this sequence, the new ones included.
    pub context_len: usize,
    pub block_table: Vec<u32>,
}

/// Where each sequence's rows and context are, in the form the attention of the batch's device
/// reads: built once per forward pass, used by every layer.
pub struct AttentionLayout {
    sequences: Vec<SequenceRows>,
    cuda: Option<cuda::paged_attention::DeviceBatchLayout>,
}

impl AttentionLayout {
    /// `block_size` and `num_blocks` are the pages' geometry, which the block tables index.
    pub fn new(
        sequences: Vec<SequenceRows>,
        block_size: usize,
        num_blocks: usize,
        device: &Device,
    ) -> Result<Self> {
        let _timer = OpTimer::start("attention_layout", *device);
        match device {
            Device::Cpu => Ok(Self {
                sequences,
                cuda: None,
            }),
            Device::Cuda(_) => {
                let max_blocks = Self::longest_table(&sequences);
                let words = Self::device_words(&sequences, max_blocks)?;
                let on_device = Tensor::from_slice(&words, [words.len()])?.to_device(device)?;
                Self::from_device_words(
                    sequences, &on_device, &words, max_blocks, block_size, num_blocks,
                )
            }
        }
    }

    /// Blocks in the longest of the sequences' tables (at least 1).
    pub fn longest_table(sequences: &[SequenceRows]) -> usize {
        sequences
            .iter()
            .map(|s| s.block_table.len())
            .max()
            .unwrap_or(0)
            .max(1)
    }

    /// The layout as the U32 words a GPU reads ([`cuda::paged_attention::DeviceBatchLayout`]'s
    /// `from_words` form), every block table padded to `max_blocks_per_seq` ids.
    pub fn device_words(sequences: &[SequenceRows], max_blocks_per_seq: usize) -> Result<Vec<u32>> {
        let shape_error = |message: String| Error::Shape {
            op: "AttentionLayout",
            message,
        };
        let n = sequences.len();
        let mut query_start = Vec::with_capacity(n + 1);
        let mut context_len = Vec::with_capacity(n);
        let mut tables = Vec::with_capacity(n * max_blocks_per_seq);
        query_start.push(0u32);
        for s in sequences {
            if s.query_start != *query_start.last().unwrap_or(&0) as usize {
                return Err(shape_error("sequences must occupy consecutive rows".into()));
            }
            if s.block_table.len() > max_blocks_per_seq {
                return Err(shape_error(format!(
                    "a table of {} blocks exceeds the {max_blocks_per_seq} a sequence may hold",
                    s.block_table.len()
                )));
            }
            query_start.push(to_u32("query rows", s.query_start + s.query_len)?);
            context_len.push(to_u32("context length", s.context_len)?);
            tables.extend_from_slice(&s.block_table);
            // Padding past a sequence's blocks is never read; block 0 keeps it in range.
            tables.resize(tables.len() + max_blocks_per_seq - s.block_table.len(), 0);
        }
        query_start.extend(context_len);
        query_start.extend(tables);
        Ok(query_start)
    }

    /// A layout whose GPU copy the caller already placed: `host_words` (from
    /// [`Self::device_words`]) copied to the start of `device_words`, which the layout views
    /// rather than copies - a caller rewriting that memory between replays of a recorded graph
    /// keeps the addresses the graph was recorded with. On the CPU `device_words` is not read.
    pub fn from_device_words(
        sequences: Vec<SequenceRows>,
        device_words: &Tensor,
        host_words: &[u32],
        max_blocks_per_seq: usize,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<Self> {
        let cuda = match device_words.device() {
            Device::Cpu => None,
            Device::Cuda(_) => Some(cuda::paged_attention::DeviceBatchLayout::from_words(
                device_words,
                host_words,
                sequences.len(),
                max_blocks_per_seq,
                block_size,
                num_blocks,
            )?),
        };
        Ok(Self { sequences, cuda })
    }

    pub fn sequences(&self) -> &[SequenceRows] {
        &self.sequences
    }
}

/// Causal attention of each sequence's query rows `q` `[tokens, heads, head_dim]` over the
/// context its block table holds in the pages (GQA when there are fewer KV heads).
pub fn paged_attention(
    q: &Tensor,
    layout: &AttentionLayout,
    params: &AttentionParams,
    k_pages: &Tensor,
    v_pages: &Tensor,
) -> Result<Tensor> {
    let _timer = OpTimer::start("paged_attention", q.device());
    match q.device() {
        Device::Cpu => {
            let geometry = page_geometry(k_pages)?;
            let spans: Vec<SequenceSpan<'_>> = layout
                .sequences
                .iter()
                .map(|s| SequenceSpan {
                    query_start: s.query_start,
                    query_len: s.query_len,
                    context_len: s.context_len,
                    block_table: &s.block_table,
                })
                .collect();
            let mut out = vec![0.0; q.elem_count()];
            cpu::attention::paged_attention(
                q.as_slice()?,
                &spans,
                params,
                &geometry,
                k_pages.as_slice()?,
                v_pages.as_slice()?,
                &mut out,
            )?;
            Ok(Tensor::from_vec(out, q.dims().to_vec())?)
        }
        Device::Cuda(_) => {
            let device_layout = layout.cuda.as_ref().ok_or_else(|| Error::Device {
                op: "paged_attention",
                message: "the layout was built for the CPU, the tensors are on a GPU".into(),
            })?;
            // Batches with prompt chunks run on tensor cores where the flash kernel covers the
            // dtype and head size; decode batches (one row per sequence) keep the split kernel,
            // which spreads a short batch over the context instead of over query rows.
            let prefill = device_layout.num_tokens() > device_layout.num_seqs();
            if prefill && cuda::flash_attention::supports(q.dtype(), params.head_dim) {
                cuda::flash_attention::flash_attention_prefill(
                    q,
                    device_layout,
                    params,
                    k_pages,
                    v_pages,
                    true,
                )
            } else {
                cuda::paged_attention::paged_attention(q, device_layout, params, k_pages, v_pages)
            }
        }
    }
}

/// The index of the largest value of each row of `logits` `[rows, vocab]`, as U32 `[rows]`.
pub fn argmax(logits: &Tensor) -> Result<Tensor> {
    let _timer = OpTimer::start("argmax", logits.device());
    match logits.device() {
        Device::Cpu => {
            let [rows, vocab] = dims2("argmax", logits)?;
            let values = logits.to_vec_f32()?;
            let ids = (0..rows)
                .map(|r| cpu::sampling::argmax(&values[r * vocab..(r + 1) * vocab]))
                .collect::<Result<Vec<u32>>>()?;
            Ok(Tensor::from_vec(ids, [rows])?)
        }
        Device::Cuda(_) => cuda::sampling::argmax(logits),
    }
}

fn weights(w: &Tensor) -> Result<Weights<'_>> {
    Ok(match w.dtype() {
        DType::F32 => Weights::F32(w.as_slice()?),
        DType::F16 => Weights::F16(w.as_slice()?),
        DType::BF16 => Weights::BF16(w.as_slice()?),
        dtype => {
            return Err(Error::DType {
                op: "linear",
                message: format!("weights of dtype {dtype} cannot be multiplied"),
            });
        }
    })
}

fn dims2(op: &'static str, t: &Tensor) -> Result<[usize; 2]> {
    match *t.dims() {
        [a, b] => Ok([a, b]),
        _ => Err(Error::Shape {
            op,
            message: format!("expected a 2-D tensor, got {:?}", t.dims()),
        }),
    }
}

fn dims3(op: &'static str, t: &Tensor) -> Result<[usize; 3]> {
    match *t.dims() {
        [a, b, c] => Ok([a, b, c]),
        _ => Err(Error::Shape {
            op,
            message: format!("expected a 3-D tensor, got {:?}", t.dims()),
        }),
    }
}

fn to_u32(what: &str, value: usize) -> Result<u32> {
    u32::try_from(value).map_err(|_| Error::Shape {
        op: "AttentionLayout",
        message: format!("{what} {value} does not fit in u32"),
    })
}

// ---------------------------------------------------------------------------------------------
// NF4 weights
// ---------------------------------------------------------------------------------------------

/// A weight matrix `[rows, cols]` stored in NF4 (bitsandbytes' format, see [`cpu::nf4`]) on the
/// device it is multiplied on: the host keeps the [`cpu::nf4::Nf4Blocks`], a GPU a
/// [`cuda::nf4::CudaNf4`]. Cloning shares the storage; [`Nf4Weight::narrow_rows`] views a range
/// of rows (a part of a fused projection) without copying.
#[derive(Clone)]
pub struct Nf4Weight {
    rows: usize,
    cols: usize,
    /// The row of the stored tensor this matrix starts at.
    first_row: usize,
    stored: std::sync::Arc<StoredNf4>,
}

enum StoredNf4 {
    Host(cpu::nf4::Nf4Blocks),
    Device(Box<cuda::nf4::CudaNf4>),
}

impl std::fmt::Debug for Nf4Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nf4Weight")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("first_row", &self.first_row)
            .field("device", &self.device())
            .finish()
    }
}

impl Nf4Weight {
    /// `blocks` as a `[rows, cols]` matrix (row-major, as the values were flattened when
    /// quantized), placed on `device`.
    pub fn new(
        blocks: cpu::nf4::Nf4Blocks,
        rows: usize,
        cols: usize,
        device: &Device,
    ) -> Result<Self> {
        if rows.checked_mul(cols) != Some(blocks.len()) {
            return Err(Error::Shape {
                op: "Nf4Weight::new",
                message: format!(
                    "{} values cannot be a [{rows}, {cols}] matrix",
                    blocks.len()
                ),
            });
        }
        let stored = match device {
            Device::Cpu => StoredNf4::Host(blocks),
            Device::Cuda(ordinal) => StoredNf4::Device(Box::new(cuda::nf4::CudaNf4::new(
                &blocks,
                &CudaDevice::get(*ordinal)?,
            )?)),
        };
        Ok(Self {
            rows,
            cols,
            first_row: 0,
            stored: std::sync::Arc::new(stored),
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn device(&self) -> Device {
        match self.stored.as_ref() {
            StoredNf4::Host(_) => Device::Cpu,
            StoredNf4::Device(w) => w.device(),
        }
    }

    /// Values per quantization block.
    pub fn block_size(&self) -> usize {
        match self.stored.as_ref() {
            StoredNf4::Host(w) => w.block_size(),
            StoredNf4::Device(w) => w.block_size(),
        }
    }

    /// Bytes of the whole stored tensor (codes and scales), which views share.
    pub fn storage_bytes(&self) -> usize {
        match self.stored.as_ref() {
            StoredNf4::Host(w) => w.storage_bytes(),
            StoredNf4::Device(w) => w.storage_bytes(),
        }
    }

    /// Rows `start .. start + len` of the matrix, sharing its storage.
    pub fn narrow_rows(&self, start: usize, len: usize) -> Result<Self> {
        if start.checked_add(len).is_none_or(|end| end > self.rows) {
            return Err(Error::Shape {
                op: "Nf4Weight::narrow_rows",
                message: format!("rows {start}..{} of {}", start + len, self.rows),
            });
        }
        Ok(Self {
            rows: len,
            first_row: self.first_row + start,
            ..self.clone()
        })
    }

    /// The matrix decoded to a dense `[rows, cols]` tensor of `dtype` on its device (the same
    /// bits as bitsandbytes' `dequantize_4bit`).
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let start = self.first_row * self.cols;
        match self.stored.as_ref() {
            StoredNf4::Host(w) => {
                let mut values = vec![0.0; self.rows * self.cols];
                w.dequantize_into(start, &mut values);
                Ok(Tensor::from_vec(values, [self.rows, self.cols])?.to_dtype(dtype)?)
            }
            StoredNf4::Device(w) => cuda::nf4::dequantize(w, start, &[self.rows, self.cols], dtype),
        }
    }

    /// The rows of the stored tensor this matrix covers.
    fn stored_rows(&self) -> std::ops::Range<usize> {
        self.first_row..self.first_row + self.rows
    }

    fn check_device(&self, op: &'static str, x: &Tensor) -> Result<()> {
        if x.device() == self.device() {
            return Ok(());
        }
        Err(Error::Device {
            op,
            message: format!(
                "x is on {:?} but the NF4 weight on {:?}",
                x.device(),
                self.device()
            ),
        })
    }
}

/// `x · wᵀ (+ bias)` with an NF4 weight `[n, k]`: [`linear`] for quantized weights. On a GPU,
/// up to [`cuda::nf4::FUSED_MAX_ROWS`] rows of f16/bf16 activations run one kernel that reads
/// the packed weights once; longer products (prefill) decode the weights into a dense scratch
/// tensor and multiply it with cuBLAS, where the product, not the weights, is the cost.
pub fn nf4_linear(x: &Tensor, w: &Nf4Weight, bias: Option<&Tensor>) -> Result<Tensor> {
    const OP: &str = "nf4_linear";
    let _timer = OpTimer::start("linear", x.device());
    w.check_device(OP, x)?;
    match w.stored.as_ref() {
        StoredNf4::Host(blocks) => {
            let [m, k] = dims2(OP, x)?;
            let mut out = vec![0.0; m * w.rows];
            let bias = bias.map(Tensor::as_slice::<f32>).transpose()?;
            cpu::nf4::linear(x.as_slice()?, m, k, blocks, w.stored_rows(), bias, &mut out)?;
            Ok(Tensor::from_vec(out, [m, w.rows])?)
        }
        StoredNf4::Device(stored) => {
            if fused_nf4(x, w) {
                cuda::nf4::linear(
                    x,
                    stored,
                    w.cols,
                    w.stored_rows(),
                    bias,
                    Epilogue::default(),
                )
            } else {
                cuda::gemm::linear(x, &w.dequantize(x.dtype())?, bias)
            }
        }
    }
}

/// [`nf4_linear`] followed by `epilogue`: [`linear_with_epilogue`] for quantized weights, fused
/// into the product where [`nf4_linear`] runs it as one kernel.
pub fn nf4_linear_with_epilogue(
    x: &Tensor,
    w: &Nf4Weight,
    bias: Option<&Tensor>,
    epilogue: Epilogue<'_>,
) -> Result<Tensor> {
    const OP: &str = "nf4_linear_with_epilogue";
    w.check_device(OP, x)?;
    match w.stored.as_ref() {
        StoredNf4::Device(stored) if fused_nf4(x, w) => {
            let _timer = OpTimer::start("linear", x.device());
            cuda::nf4::linear(x, stored, w.cols, w.stored_rows(), bias, epilogue)
        }
        _ if epilogue.activation == OutputActivation::Identity && epilogue.addend.is_none() => {
            nf4_linear(x, w, bias)
        }
        _ => {
            let dense = w.dequantize(match x.device() {
                Device::Cpu => DType::F32,
                Device::Cuda(_) => x.dtype(),
            })?;
            linear_with_epilogue(x, &dense, bias, epilogue)
        }
    }
}

/// Whether the GPU product of `x` and `w` runs on the packed weights.
fn fused_nf4(x: &Tensor, w: &Nf4Weight) -> bool {
    let k = x.dims().last().copied().unwrap_or(0);
    let m = x.elem_count() / k.max(1);
    k == w.cols
        && x.is_contiguous()
        && (x.layout().offset() * x.dtype().size_in_bytes()).is_multiple_of(16)
        && cuda::nf4::fused_linear_supported(x.dtype(), m, k, w.block_size())
}
