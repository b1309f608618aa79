//! A batch of sequences for the attention tests: random queries and K/V pages behind scattered
//! block tables (see [`ScatteredTables`]), on the device and on the host, with the CPU oracle's
//! causal result.

use pagoda_kernels::cpu;
use pagoda_kernels::cpu::attention::{AttentionParams, SequenceSpan};
use pagoda_kernels::cpu::kv_write::PageGeometry;
use pagoda_kernels::cuda::paged_attention::DeviceBatchLayout;
use pagoda_tensor::{CudaDevice, DType, Tensor};

use super::{ScatteredTables, TestRng, random_tensor, upload};

/// A batch: per sequence `(query_len, context_len)`, the heads, and how K/V pages are cut.
pub struct Case<'a> {
    pub seqs: &'a [(usize, usize)],
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

/// A batch on the device and the host values it holds.
pub struct Batch {
    pub layout: DeviceBatchLayout,
    pub params: AttentionParams,
    pub geometry: PageGeometry,
    pub query_start: Vec<u32>,
    pub tables: Vec<u32>,
    pub max_blocks: usize,
    pub q: Tensor,
    pub k_pages: Tensor,
    pub v_pages: Tensor,
    pub q_values: Vec<f32>,
    pub k_values: Vec<f32>,
    pub v_values: Vec<f32>,
}

impl Batch {
    pub fn new(device: &CudaDevice, rng: &mut TestRng, case: &Case<'_>, dtype: DType) -> Batch {
        let Case {
            seqs,
            num_heads,
            num_kv_heads,
            head_dim,
            block_size,
        } = *case;
        let ScatteredTables {
            query_start,
            context_len,
            tables,
            num_blocks,
            max_blocks,
            num_tokens,
        } = ScatteredTables::new(rng, seqs, block_size);
        let geometry = PageGeometry {
            num_blocks,
            block_size,
            num_kv_heads,
            head_dim,
        };
        let page_dims = [num_blocks, block_size, num_kv_heads, head_dim];
        // Queries at 4x the keys' scale give scores of standard deviation ~1.3 at any head_dim,
        // so the softmax is neither flat nor one-hot.
        let (q, q_values) =
            random_tensor(rng, &[num_tokens, num_heads, head_dim], dtype, 4.0, device);
        let (k_pages, k_values) = random_tensor(rng, &page_dims, dtype, 1.0, device);
        let (v_pages, v_values) = random_tensor(rng, &page_dims, dtype, 1.0, device);
        let layout = DeviceBatchLayout::new(
            &query_start,
            &context_len,
            &tables,
            max_blocks,
            block_size,
            num_blocks,
            device,
        )
        .unwrap();
        Batch {
            layout,
            params: AttentionParams {
                num_heads,
                num_kv_heads,
                head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(),
            },
            geometry,
            query_start,
            tables,
            max_blocks,
            q,
            k_pages,
            v_pages,
            q_values,
            k_values,
            v_values,
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.layout.num_tokens()
    }

    pub fn out_len(&self) -> usize {
        self.num_tokens() * self.params.num_heads * self.params.head_dim
    }

    /// Causal attention on the CPU oracle.
    pub fn causal_reference(&self, seqs: &[(usize, usize)]) -> Vec<f32> {
        let spans: Vec<SequenceSpan<'_>> = seqs
            .iter()
            .enumerate()
            .map(|(s, &(query_len, context))| SequenceSpan {
                query_start: self.query_start[s] as usize,
                query_len,
                context_len: context,
                block_table: &self.tables[s * self.max_blocks..(s + 1) * self.max_blocks],
            })
            .collect();
        let mut expected = vec![0.0; self.out_len()];
        cpu::attention::paged_attention(
            &self.q_values,
            &spans,
            &self.params,
            &self.geometry,
            &self.k_values,
            &self.v_values,
            &mut expected,
        )
        .unwrap();
        expected
    }
}

impl Batch {
    /// The same batch with both page tensors moved one element into their storage (a view at an
    /// element offset of 1, never 16-byte aligned), for the kernels' unaligned paths.
    pub fn misalign_pages(&mut self, device: &CudaDevice) {
        let dims = self.k_pages.dims().to_vec();
        let dtype = self.k_pages.dtype();
        self.k_pages = offset_by_one(&self.k_values, &dims, dtype, device);
        self.v_pages = offset_by_one(&self.v_values, &dims, dtype, device);
    }
}

/// `values` as a tensor of `dims` whose storage holds one element more before them: a contiguous
/// view at an element offset of 1, never 16-byte aligned.
fn offset_by_one(values: &[f32], dims: &[usize], dtype: DType, device: &CudaDevice) -> Tensor {
    let padded = [&[0.5], values].concat();
    upload(&padded, &[padded.len()], dtype, device)
        .narrow(0, 1, values.len())
        .and_then(|t| t.reshape(dims.to_vec()))
        .unwrap_or_else(|e| panic!("viewing {dims:?} at an offset: {e}"))
}
