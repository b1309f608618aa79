//! Embedding lookup: gathers one table row per token id.

use rayon::prelude::*;

use crate::error::expect_len;
use crate::{Error, Result};

use super::gemm::Weights;

/// `out[t] = table[ids[t]]` as f32, with `table` row-major `[rows, hidden]`.
///
/// Every id is checked against the table's row count before anything is written.
pub fn embedding(table: Weights<'_>, hidden: usize, ids: &[u32], out: &mut [f32]) -> Result<()> {
    const OP: &str = "embedding";
    if hidden == 0 {
        return Err(Error::shape(OP, "hidden size must be positive"));
    }
    if !table.len().is_multiple_of(hidden) {
        return Err(Error::shape(
            OP,
            format!(
                "table has {} elements, not a multiple of hidden size {hidden}",
                table.len()
            ),
        ));
    }
    let rows = table.len() / hidden;
    expect_len(OP, "out", out.len(), &[ids.len(), hidden])?;
    if let Some((token, id)) = ids.iter().enumerate().find(|(_, id)| **id as usize >= rows) {
        return Err(Error::shape(
            OP,
            format!("token {token} has id {id}, but the table has {rows} rows"),
        ));
    }
    out.par_chunks_exact_mut(hidden)
        .zip(ids)
        .for_each(|(out, &id)| table.row_to_f32(id as usize, hidden, out));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn gathers_rows_in_every_storage_type() {
        let table: Vec<f32> = (0..12).map(|v| v as f32 * 0.5).collect();
        let table_f16: Vec<f16> = table.iter().map(|&v| f16::from_f32(v)).collect();
        let table_bf16: Vec<bf16> = table.iter().map(|&v| bf16::from_f32(v)).collect();
        let ids = [3, 0, 3, 1];
        let expected = [4.5, 5.0, 5.5, 0.0, 0.5, 1.0, 4.5, 5.0, 5.5, 1.5, 2.0, 2.5];
        for table in [
            Weights::F32(&table),
            Weights::F16(&table_f16),
            Weights::BF16(&table_bf16),
        ] {
            let mut out = [f32::NAN; 12];
            embedding(table, 3, &ids, &mut out).unwrap();
            assert_eq!(out, expected, "{table:?}");
        }
    }

    #[test]
    fn out_of_range_id_is_an_error_naming_it() {
        let table = [0.0f32; 8];
        let mut out = [f32::NAN; 4];
        let error = embedding(Weights::F32(&table), 2, &[1, 4], &mut out).unwrap_err();
        assert!(matches!(
            error,
            Error::Shape {
                op: "embedding",
                ..
            }
        ));
        assert!(error.to_string().contains("id 4"), "{error}");
        assert!(
            out.iter().all(|v| v.is_nan()),
            "nothing is written on error"
        );
    }

    #[test]
    fn rejects_mismatched_lengths() {
        let table = [0.0f32; 8];
        let mut out = [0.0; 4];
        assert!(embedding(Weights::F32(&table), 3, &[0, 1], &mut out[..3]).is_err());
        assert!(embedding(Weights::F32(&table), 2, &[0, 1], &mut out[..3]).is_err());
        assert!(embedding(Weights::F32(&table), 0, &[], &mut out[..0]).is_err());
        assert!(embedding(Weights::F32(&table), 2, &[], &mut out[..0]).is_ok());
    }
}
