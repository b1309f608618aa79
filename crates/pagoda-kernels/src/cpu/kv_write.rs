//! Writing a batch's new keys and values into the paged KV cache.

use crate::error::{checked_product, expect_len};
use crate::{Error, Result};

/// The layout of one layer's K (or V) pages: f32 `[num_blocks, block_size, num_kv_heads,
/// head_dim]`. A token's slot is `block * block_size + offset`, its index among all
/// `num_blocks * block_size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageGeometry {
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl PageGeometry {
    /// Elements of one token's keys (or values): `num_kv_heads * head_dim`.
    pub fn token_len(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Checks that the dimensions are positive and the pages' element count fits in `usize`, and
    /// returns the number of slots.
    pub(crate) fn validate(&self, op: &'static str) -> Result<usize> {
        let PageGeometry {
            num_blocks,
            block_size,
            num_kv_heads,
            head_dim,
        } = *self;
        if block_size == 0 || num_kv_heads == 0 || head_dim == 0 {
            return Err(Error::shape(
                op,
                format!("page geometry {self:?} has a zero dimension"),
            ));
        }
        // A block is at least one token long, so a valid block length bounds `token_len` too.
        let block_len = checked_product(op, &[block_size, num_kv_heads, head_dim])?;
        checked_product(op, &[num_blocks, block_len])?;
        Ok(num_blocks * block_size)
    }

    /// Checks that a page tensor named `name` has exactly the geometry's element count.
    pub(crate) fn expect_pages(&self, op: &'static str, name: &str, len: usize) -> Result<()> {
        expect_len(
            op,
            name,
            len,
            &[
                self.num_blocks,
                self.block_size,
                self.num_kv_heads,
                self.head_dim,
            ],
        )
    }
}

/// Copies token `t`'s keys `k[t]` and values `v[t]` (each `[num_tokens, num_kv_heads, head_dim]`)
/// into slot `slots[t]` of `k_pages` and `v_pages`.
///
/// Every slot is checked before anything is written. If two tokens name the same slot, the later
/// one's data is what remains.
pub fn write_kv(
    k: &[f32],
    v: &[f32],
    slots: &[u32],
    geometry: &PageGeometry,
    k_pages: &mut [f32],
    v_pages: &mut [f32],
) -> Result<()> {
    const OP: &str = "write_kv";
    let num_slots = geometry.validate(OP)?;
    let token_len = geometry.token_len();
    expect_len(
        OP,
        "k",
        k.len(),
        &[slots.len(), geometry.num_kv_heads, geometry.head_dim],
    )?;
    expect_len(
        OP,
        "v",
        v.len(),
        &[slots.len(), geometry.num_kv_heads, geometry.head_dim],
    )?;
    geometry.expect_pages(OP, "k_pages", k_pages.len())?;
    geometry.expect_pages(OP, "v_pages", v_pages.len())?;
    if let Some((token, slot)) = slots
        .iter()
        .enumerate()
        .find(|(_, slot)| **slot as usize >= num_slots)
    {
        return Err(Error::shape(
            OP,
            format!("token {token} has slot {slot}, but the pages hold {num_slots} slots"),
        ));
    }
    // A plain copy bound by memory bandwidth: threads would not speed it up, and keeping it in
    // token order defines what duplicate slots do.
    for ((&slot, k), v) in slots
        .iter()
        .zip(k.chunks_exact(token_len))
        .zip(v.chunks_exact(token_len))
    {
        let range = slot as usize * token_len..(slot as usize + 1) * token_len;
        k_pages[range.clone()].copy_from_slice(k);
        v_pages[range].copy_from_slice(v);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEOMETRY: PageGeometry = PageGeometry {
        num_blocks: 3,
        block_size: 4,
        num_kv_heads: 2,
        head_dim: 3,
    };

    #[test]
    fn writes_each_token_into_its_slot_and_nothing_else() {
        let slots = [5, 0, 11];
        let k: Vec<f32> = (0..18).map(|v| v as f32).collect();
        let v: Vec<f32> = (0..18).map(|v| -(v as f32)).collect();
        let mut k_pages = vec![f32::NAN; 72];
        let mut v_pages = vec![f32::NAN; 72];
        write_kv(&k, &v, &slots, &GEOMETRY, &mut k_pages, &mut v_pages).unwrap();
        for slot in 0..12 {
            let written = slots.iter().position(|&s| s == slot as u32);
            for e in 0..6 {
                let (kp, vp) = (k_pages[slot * 6 + e], v_pages[slot * 6 + e]);
                match written {
                    // slot = block * block_size + offset: slot 5 is block 1, offset 1.
                    Some(t) => assert_eq!((kp, vp), (k[t * 6 + e], v[t * 6 + e])),
                    None => assert!(kp.is_nan() && vp.is_nan(), "slot {slot} untouched"),
                }
            }
        }
    }

    #[test]
    fn later_tokens_win_a_shared_slot() {
        let mut k_pages = vec![0.0; 72];
        let mut v_pages = vec![0.0; 72];
        let k: Vec<f32> = (0..12).map(|v| v as f32).collect();
        write_kv(&k, &k, &[2, 2], &GEOMETRY, &mut k_pages, &mut v_pages).unwrap();
        assert_eq!(k_pages[12..18], k[6..]);
    }

    #[test]
    fn rejects_out_of_range_slots_and_bad_lengths() {
        let mut k_pages = vec![0.0; 72];
        let mut v_pages = vec![0.0; 72];
        let k = [1.0; 12];
        let error = write_kv(&k, &k, &[0, 12], &GEOMETRY, &mut k_pages, &mut v_pages).unwrap_err();
        assert!(error.to_string().contains("slot 12"), "{error}");
        assert!(
            k_pages.iter().all(|&v| v == 0.0),
            "nothing is written on error"
        );
        assert!(write_kv(&k[..6], &k, &[0, 1], &GEOMETRY, &mut k_pages, &mut v_pages).is_err());
        assert!(write_kv(&k, &k, &[0], &GEOMETRY, &mut k_pages, &mut v_pages).is_err());
        assert!(write_kv(&k, &k, &[0, 1], &GEOMETRY, &mut k_pages[..71], &mut v_pages).is_err());
        let empty = PageGeometry {
            block_size: 0,
            ..GEOMETRY
        };
        assert!(write_kv(&[], &[], &[], &empty, &mut [], &mut []).is_err());
    }
}
