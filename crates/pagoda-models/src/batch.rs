use pagoda_kv::BlockTable;

use crate::{Error, Result};

/// One sequence's part of a flat batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchSequence {
    /// First row of this sequence's tokens in [`Batch::tokens`].
    pub query_start: usize,
    /// Number of new tokens of this sequence in the batch.
    pub query_len: usize,
    /// Tokens of the sequence once this batch has run: cached context plus the new ones.
    pub context_len: usize,
    /// The sequence's KV blocks, in order; they must cover `context_len` tokens.
    pub block_table: Vec<u32>,
}

/// A flat, unpadded batch of tokens from several sequences: the unit of work of one forward pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub tokens: Vec<u32>,
    /// Position of each token in its sequence.
    pub positions: Vec<u32>,
    /// KV slot (`block * block_size + offset`) that each token's K/V is written to.
    pub slots: Vec<u32>,
    pub sequences: Vec<BatchSequence>,
    /// Rows of `tokens` whose logits the caller wants (usually the last row of each sequence).
    pub logits_rows: Vec<usize>,
}

impl Batch {
    /// The batch that runs one sequence's newest `tokens`, which `table` already holds (they are
    /// its last `tokens.len()` positions), asking for the logits of the last one.
    pub fn last_of_sequence(tokens: &[u32], table: &BlockTable) -> Result<Self> {
        let end = table.num_tokens();
        let start = end
            .checked_sub(tokens.len())
            .filter(|_| !tokens.is_empty())
            .ok_or_else(|| {
                Error::Batch(format!(
                    "{} new tokens for a sequence of {end} tokens",
                    tokens.len()
                ))
            })?;
        let slots = (start..end)
            .map(|p| {
                table
                    .slot(p)
                    .ok_or_else(|| Error::Batch(format!("no KV slot for position {p}")))
            })
            .collect::<Result<Vec<u32>>>()?;
        Ok(Self {
            tokens: tokens.to_vec(),
            positions: (start..end).map(|p| p as u32).collect(),
            slots,
            sequences: vec![BatchSequence {
                query_start: 0,
                query_len: tokens.len(),
                context_len: end,
                block_table: table.block_ids_u32(),
            }],
            logits_rows: vec![tokens.len() - 1],
        })
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Checks that the per-token arrays agree and every sequence's rows lie inside the batch,
    /// so that a malformed batch fails here with a message instead of deep inside a kernel.
    pub fn validate(&self, max_positions: usize) -> Result<()> {
        let n = self.tokens.len();
        if n == 0 {
            return Err(Error::Batch("the batch holds no tokens".into()));
        }
        if self.positions.len() != n || self.slots.len() != n {
            return Err(Error::Batch(format!(
                "{n} tokens but {} positions and {} slots",
                self.positions.len(),
                self.slots.len()
            )));
        }
        if let Some(&p) = self
            .positions
            .iter()
            .find(|&&p| p as usize >= max_positions)
        {
            return Err(Error::Batch(format!(
                "position {p} is beyond the model's context of {max_positions} tokens"
            )));
        }
        let mut covered = 0;
        for (i, s) in self.sequences.iter().enumerate() {
            if s.query_start != covered || s.query_len == 0 || s.query_len > s.context_len {
                return Err(Error::Batch(format!(
                    "sequence {i}: rows {}..{} of context {} do not follow the previous sequence (row {covered})",
                    s.query_start,
                    s.query_start + s.query_len,
                    s.context_len
                )));
            }
            covered += s.query_len;
        }
        if covered != n {
            return Err(Error::Batch(format!(
                "sequences cover {covered} of {n} tokens"
            )));
        }
        if let Some(&r) = self.logits_rows.iter().find(|&&r| r >= n) {
            return Err(Error::Batch(format!(
                "logits row {r} is beyond the {n} tokens"
            )));
        }
        Ok(())
    }
}
