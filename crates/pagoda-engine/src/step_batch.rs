//! One engine step's work as the model takes it: the scheduled chunks of every request packed
//! into flat [`Batch`]es.

use pagoda_kernels::cpu::gemm::ROW_DOTS_MAX_M;
use pagoda_kv::BlockTable;
use pagoda_models::{Batch, BatchSequence};

use crate::{Error, Result};

/// Most token rows of one forward pass on the CPU.
///
/// pagoda-kernels' CPU `linear` computes every output of a product of up to
/// [`ROW_DOTS_MAX_M`] rows as one dot product of an input row and a weight row, and larger
/// products with a blocked GEMM whose
/// rounding depends on the number of rows. Every other CPU op works row by row (attention per
/// query row, over the pages in position order). Forward passes of at most that many rows therefore
/// give each token the same logits, to the bit, whatever else the step holds: a request's
/// output does not depend on the batch it runs in.
pub(crate) const CPU_MAX_FORWARD_ROWS: usize = ROW_DOTS_MAX_M;

/// One request's tokens in a step: positions `start..start + tokens.len()` of its sequence,
/// whose slots `table` already holds.
pub(crate) struct Chunk<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    pub table: &'a BlockTable,
    /// Whether the logits of the last token are wanted (the chunk ends the known tokens).
    pub wants_logits: bool,
}

/// Packs `chunks`, in order, into batches of at most `max_rows` tokens; a chunk may be split
/// over consecutive batches (its later part then reads the K/V its earlier part wrote). The
/// logits rows of the batches, in order, are those of the chunks that want them, in order.
pub(crate) fn pack(chunks: &[Chunk<'_>], max_rows: usize) -> Result<Vec<Batch>> {
    let max_rows = max_rows.max(1);
    let mut batches = Vec::new();
    let mut batch = Batch::default();
    for chunk in chunks {
        let end = chunk.start + chunk.tokens.len();
        let block_table = chunk.table.block_ids_u32();
        let mut position = chunk.start;
        while position < end {
            if batch.tokens.len() == max_rows {
                batches.push(std::mem::take(&mut batch));
            }
            let count = (end - position).min(max_rows - batch.tokens.len());
            let query_start = batch.tokens.len();
            for p in position..position + count {
                let slot = chunk.table.slot(p).ok_or_else(|| {
                    Error::Internal(format!(
                        "the block table holds {} tokens; position {p} has no KV slot",
                        chunk.table.num_tokens()
                    ))
                })?;
                batch.tokens.push(chunk.tokens[p - chunk.start]);
                batch.positions.push(position_u32(p)?);
                batch.slots.push(slot);
            }
            position += count;
            batch.sequences.push(BatchSequence {
                query_start,
                query_len: count,
                context_len: position,
                block_table: block_table.clone(),
            });
            if position == end && chunk.wants_logits {
                batch.logits_rows.push(batch.tokens.len() - 1);
            }
        }
    }
    if !batch.tokens.is_empty() {
        batches.push(batch);
    }
    Ok(batches)
}

fn position_u32(position: usize) -> Result<u32> {
    u32::try_from(position)
        .map_err(|_| Error::Internal(format!("position {position} does not fit in 32 bits")))
}

/// Whether every sequence of `batch` computes one token and wants its logits: a decode step,
/// whose shape depends on the number of sequences alone.
pub(crate) fn is_decode(batch: &Batch) -> bool {
    batch.sequences.len() == batch.tokens.len() && batch.logits_rows.len() == batch.tokens.len()
}

/// Pads a decode batch to `rows` sequences with one-token sequences at position 0 that write
/// into (and read) the first slot of `pad_block`, a block no request holds; their logits rows
/// come after the real ones and are ignored.
pub(crate) fn pad_decode(batch: &mut Batch, rows: usize, pad_block: u32, block_size: usize) {
    let pad_slot = pad_block * block_size as u32;
    for row in batch.tokens.len()..rows {
        batch.tokens.push(0);
        batch.positions.push(0);
        batch.slots.push(pad_slot);
        batch.sequences.push(BatchSequence {
            query_start: row,
            query_len: 1,
            context_len: 1,
            block_table: vec![pad_block],
        });
        batch.logits_rows.push(row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagoda_kv::BlockAllocator;

    fn table(allocator: &mut BlockAllocator, tokens: usize) -> BlockTable {
        let mut table = BlockTable::new(4);
        table.append(tokens, allocator).unwrap();
        table
    }

    #[test]
    fn chunks_split_over_batches_keep_positions_slots_and_logits_rows() {
        let mut allocator = BlockAllocator::new(16);
        let a = table(&mut allocator, 6); // blocks 0, 1
        let b = table(&mut allocator, 9); // blocks 2, 3, 4
        let a_tokens = [10, 11, 12, 13, 14];
        let chunks = [
            // a: positions 1..6 (position 0 computed earlier), ends its tokens.
            Chunk {
                tokens: &a_tokens,
                start: 1,
                table: &a,
                wants_logits: true,
            },
            // b: a decode at position 8.
            Chunk {
                tokens: &[20],
                start: 8,
                table: &b,
                wants_logits: true,
            },
        ];
        let batches = pack(&chunks, 4).unwrap();
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0].tokens, [10, 11, 12, 13]);
        assert_eq!(batches[0].positions, [1, 2, 3, 4]);
        assert_eq!(batches[0].slots, [1, 2, 3, 4]);
        assert_eq!(batches[0].sequences.len(), 1);
        assert_eq!(batches[0].sequences[0].context_len, 5);
        assert!(batches[0].logits_rows.is_empty());
        assert_eq!(batches[1].tokens, [14, 20]);
        assert_eq!(batches[1].positions, [5, 8]);
        // Position 8 of b is offset 0 of its third block, block 4.
        assert_eq!(batches[1].slots, [5, 16]);
        assert_eq!(
            batches[1].sequences,
            [
                BatchSequence {
                    query_start: 0,
                    query_len: 1,
                    context_len: 6,
                    block_table: vec![0, 1],
                },
                BatchSequence {
                    query_start: 1,
                    query_len: 1,
                    context_len: 9,
                    block_table: vec![2, 3, 4],
                },
            ]
        );
        assert_eq!(batches[1].logits_rows, [0, 1]);
        for batch in &batches {
            batch.validate(128).unwrap();
        }
        // One batch when the rows allow.
        let whole = pack(&chunks, usize::MAX).unwrap();
        assert_eq!(whole.len(), 1);
        assert_eq!(whole[0].logits_rows, [4, 5]);
        assert!(!is_decode(&whole[0]));
    }

    #[test]
    fn a_chunk_beyond_its_table_is_an_error() {
        let mut allocator = BlockAllocator::new(4);
        let short = table(&mut allocator, 2);
        let chunks = [Chunk {
            tokens: &[1, 2, 3],
            start: 0,
            table: &short,
            wants_logits: true,
        }];
        assert!(matches!(pack(&chunks, 16), Err(Error::Internal(_))));
    }

    #[test]
    fn decode_batches_pad_into_a_spare_block() {
        let mut allocator = BlockAllocator::new(8);
        let a = table(&mut allocator, 3);
        let chunks = [Chunk {
            tokens: &[7],
            start: 2,
            table: &a,
            wants_logits: true,
        }];
        let mut batch = pack(&chunks, 16).unwrap().remove(0);
        assert!(is_decode(&batch));
        pad_decode(&mut batch, 4, 7, 4);
        batch.validate(128).unwrap();
        assert!(is_decode(&batch));
        assert_eq!(batch.tokens, [7, 0, 0, 0]);
        assert_eq!(batch.slots, [2, 28, 28, 28]);
        assert_eq!(batch.logits_rows, [0, 1, 2, 3]);
        assert_eq!(batch.sequences[3].block_table, [7]);
    }
}
