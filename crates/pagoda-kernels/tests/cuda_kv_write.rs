//! CUDA writes of K/V into pages, plain and with RoPE fused on K, against the CPU oracles.
#![cfg(feature = "cuda")]

mod common;

use common::{
    FLOAT_DTYPES, TestRng, assert_close, download, gpu_or_skip, poisoned, random_tensor, upload_u32,
};
use pagoda_kernels::cpu::kv_write::PageGeometry;
use pagoda_kernels::cpu::rope::RopeTable;
use pagoda_kernels::cuda::kv_write::{rope_qk_write_kv, rope_write_kv, write_kv};
use pagoda_kernels::cuda::rope::CudaRopeTable;
use pagoda_kernels::{Error, cpu};
use pagoda_tensor::{CudaDevice, DType};
use rand::seq::SliceRandom;

/// `tokens` distinct slots in random order, scattered over all of the pages.
fn scattered_slots(rng: &mut TestRng, geometry: &PageGeometry, tokens: usize) -> Vec<u32> {
    let mut slots: Vec<u32> = (0..(geometry.num_blocks * geometry.block_size) as u32).collect();
    slots.shuffle(rng.rng());
    slots.truncate(tokens);
    slots
}

fn page_dims(geometry: &PageGeometry) -> [usize; 4] {
    [
        geometry.num_blocks,
        geometry.block_size,
        geometry.num_kv_heads,
        geometry.head_dim,
    ]
}

/// Pages written on the GPU against the CPU's, both starting as NaN: the written slots must match
/// and every other element must still be NaN.
fn assert_pages(what: &str, actual: &[f32], expected: &[f32], dtype: DType) {
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert_eq!(
            a.is_nan(),
            e.is_nan(),
            "{what}: element {i} is {a}, expected {e}"
        );
    }
    let zeroed = |v: &[f32]| {
        v.iter()
            .map(|&x| if x.is_nan() { 0.0 } else { x })
            .collect::<Vec<_>>()
    };
    assert_close(what, &zeroed(actual), &zeroed(expected), dtype);
}

const GEOMETRIES: [PageGeometry; 3] = [
    PageGeometry {
        num_blocks: 7,
        block_size: 16,
        num_kv_heads: 2,
        head_dim: 64,
    },
    PageGeometry {
        num_blocks: 5,
        block_size: 3,
        num_kv_heads: 3,
        head_dim: 5,
    },
    PageGeometry {
        num_blocks: 3,
        block_size: 1,
        num_kv_heads: 1,
        head_dim: 80,
    },
];

/// The pages (NaN where nothing is written) after the CPU oracles rotate `k` at `positions` and
/// write `k` and `v` into `slots`.
fn rope_write_oracle(
    geometry: &PageGeometry,
    (k, v): (&[f32], &[f32]),
    slots: &[u32],
    positions: &[u32],
    table: &RopeTable,
) -> (Vec<f32>, Vec<f32>) {
    let mut rotated = k.to_vec();
    cpu::rope::apply_rope(
        &mut rotated,
        geometry.num_kv_heads,
        geometry.head_dim,
        positions,
        table,
    )
    .unwrap();
    let mut pages_k = vec![f32::NAN; page_dims(geometry).iter().product()];
    let mut pages_v = pages_k.clone();
    cpu::kv_write::write_kv(&rotated, v, slots, geometry, &mut pages_k, &mut pages_v).unwrap();
    (pages_k, pages_v)
}

fn run_write(
    device: &CudaDevice,
    rng: &mut TestRng,
    geometry: &PageGeometry,
    tokens: usize,
    dtype: DType,
    rope: Option<&RopeTable>,
) {
    let dims = [tokens, geometry.num_kv_heads, geometry.head_dim];
    let (k, k_values) = random_tensor(rng, &dims, dtype, 2.0, device);
    let (v, v_values) = random_tensor(rng, &dims, dtype, 2.0, device);
    let mut slots = scattered_slots(rng, geometry, tokens);
    let positions = rng.below(tokens, 512);
    let pages = page_dims(geometry);
    let mut k_pages = poisoned(&pages, dtype, device);
    let mut v_pages = poisoned(&pages, dtype, device);
    let mut expected_k = vec![f32::NAN; pages.iter().product()];
    let mut expected_v = expected_k.clone();

    let slots_gpu = upload_u32(&slots, device);
    let what = format!(
        "{dtype} {geometry:?} {tokens} tokens rope {}",
        rope.is_some()
    );
    match rope {
        None => {
            write_kv(&k, &v, &slots_gpu, &mut k_pages, &mut v_pages).unwrap();
            cpu::kv_write::write_kv(
                &k_values,
                &v_values,
                &slots,
                geometry,
                &mut expected_k,
                &mut expected_v,
            )
            .unwrap();
        }
        Some(table) => {
            let gpu_table = CudaRopeTable::new(table, device).unwrap();
            let positions_gpu = upload_u32(&positions, device);
            rope_write_kv(
                &k,
                &v,
                &positions_gpu,
                &slots_gpu,
                &gpu_table,
                &mut k_pages,
                &mut v_pages,
            )
            .unwrap();
            (expected_k, expected_v) =
                rope_write_oracle(geometry, (&k_values, &v_values), &slots, &positions, table);
            assert_eq!(download(&k), k_values, "{what}: k itself must not change");
        }
    }
    assert_pages(
        &format!("k pages, {what}"),
        &download(&k_pages),
        &expected_k,
        dtype,
    );
    assert_pages(
        &format!("v pages, {what}"),
        &download(&v_pages),
        &expected_v,
        dtype,
    );

    // Padding rows: a slot past the pages writes nothing.
    slots.iter_mut().for_each(|s| *s = u32::MAX);
    let before = (download(&k_pages), download(&v_pages));
    write_kv(
        &k,
        &v,
        &upload_u32(&slots, device),
        &mut k_pages,
        &mut v_pages,
    )
    .unwrap();
    let after = (download(&k_pages), download(&v_pages));
    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(
        same(&before.0, &after.0) && same(&before.1, &after.1),
        "{what}: padding slots wrote"
    );
}

#[test]
fn write_kv_matches_the_cpu_with_scattered_slots() {
    let Some(device) = gpu_or_skip("write_kv_matches_the_cpu") else {
        return;
    };
    let mut rng = TestRng::new("write_kv_matches_the_cpu");
    for geometry in &GEOMETRIES {
        let slots = geometry.num_blocks * geometry.block_size;
        for tokens in [1, 2, slots / 2 + 1, slots] {
            for dtype in FLOAT_DTYPES {
                run_write(&device, &mut rng, geometry, tokens, dtype, None);
            }
        }
    }
}

#[test]
fn rope_write_kv_matches_apply_rope_then_write_kv() {
    let Some(device) = gpu_or_skip("rope_write_kv_matches") else {
        return;
    };
    let mut rng = TestRng::new("rope_write_kv_matches");
    for geometry in &GEOMETRIES {
        // Full rotation and a partial one (Pythia rotates a quarter of each head).
        let rotary_dims = [
            geometry.head_dim / 2 * 2,
            ((geometry.head_dim / 4) & !1).max(2),
        ];
        for rotary_dim in rotary_dims {
            let table = RopeTable::new(rotary_dim, 10000.0, 512, None).unwrap();
            let slots = geometry.num_blocks * geometry.block_size;
            for tokens in [1, slots / 2 + 1, slots] {
                for dtype in FLOAT_DTYPES {
                    run_write(&device, &mut rng, geometry, tokens, dtype, Some(&table));
                }
            }
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    let Some(device) = gpu_or_skip("kv_write_bad_inputs") else {
        return;
    };
    let mut rng = TestRng::new("kv_write_bad_inputs");
    let geometry = GEOMETRIES[0];
    let pages = page_dims(&geometry);
    let (k, _) = random_tensor(&mut rng, &[2, 2, 64], DType::F16, 1.0, &device);
    let slots = upload_u32(&[0, 5], &device);
    let mut k_pages = poisoned(&pages, DType::F16, &device);
    let mut v_pages = poisoned(&pages, DType::F16, &device);
    let mut f32_pages = poisoned(&pages, DType::F32, &device);
    assert!(matches!(
        write_kv(&k, &k, &slots, &mut f32_pages, &mut v_pages),
        Err(Error::DType { .. })
    ));
    assert!(matches!(
        write_kv(
            &k,
            &k,
            &upload_u32(&[0], &device),
            &mut k_pages,
            &mut v_pages
        ),
        Err(Error::Shape { .. })
    ));
    let mut wrong_heads = poisoned(&[7, 16, 1, 128], DType::F16, &device);
    let mut wrong_heads_v = poisoned(&[7, 16, 1, 128], DType::F16, &device);
    assert!(matches!(
        write_kv(&k, &k, &slots, &mut wrong_heads, &mut wrong_heads_v),
        Err(Error::Shape { .. })
    ));
    let (short_v, _) = random_tensor(&mut rng, &[1, 2, 64], DType::F16, 1.0, &device);
    assert!(matches!(
        write_kv(&k, &short_v, &slots, &mut k_pages, &mut v_pages),
        Err(Error::Shape { .. })
    ));

    let table =
        CudaRopeTable::new(&RopeTable::new(128, 10000.0, 16, None).unwrap(), &device).unwrap();
    let positions = upload_u32(&[0, 1], &device);
    let result = rope_write_kv(
        &k,
        &k,
        &positions,
        &slots,
        &table,
        &mut k_pages,
        &mut v_pages,
    );
    assert!(
        matches!(result, Err(Error::Shape { .. })),
        "rotary_dim 128 > head_dim 64: {result:?}"
    );
}

#[test]
fn rope_qk_write_kv_rotates_queries_and_writes_keys() {
    let Some(device) = gpu_or_skip("rope_qk_write_kv") else {
        return;
    };
    let mut rng = TestRng::new("rope_qk_write_kv");
    for geometry in &GEOMETRIES {
        let rotary_dim = ((geometry.head_dim / 4) & !1).max(2);
        let table = RopeTable::new(rotary_dim, 10000.0, 512, None).unwrap();
        let gpu_table = CudaRopeTable::new(&table, &device).unwrap();
        let tokens = geometry.num_blocks * geometry.block_size / 2 + 1;
        // Query heads: as many as the KV heads, and a GQA group of 4 per KV head.
        for q_heads in [geometry.num_kv_heads, 4 * geometry.num_kv_heads] {
            for dtype in FLOAT_DTYPES {
                let what = format!("{dtype} {geometry:?} {tokens} tokens {q_heads} query heads");
                let kv_dims = [tokens, geometry.num_kv_heads, geometry.head_dim];
                let q_dims = [tokens, q_heads, geometry.head_dim];
                let (q, q_values) = random_tensor(&mut rng, &q_dims, dtype, 2.0, &device);
                let (k, k_values) = random_tensor(&mut rng, &kv_dims, dtype, 2.0, &device);
                let (v, v_values) = random_tensor(&mut rng, &kv_dims, dtype, 2.0, &device);
                let slots = scattered_slots(&mut rng, geometry, tokens);
                let positions = rng.below(tokens, 512);
                let pages = page_dims(geometry);
                let mut k_pages = poisoned(&pages, dtype, &device);
                let mut v_pages = poisoned(&pages, dtype, &device);
                common::poison_pool(&device, q_values.len() * dtype.size_in_bytes());
                let rotated_q = rope_qk_write_kv(
                    &q,
                    &k,
                    &v,
                    &upload_u32(&positions, &device),
                    &upload_u32(&slots, &device),
                    &gpu_table,
                    &mut k_pages,
                    &mut v_pages,
                )
                .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(rotated_q.dims(), &q_dims[..], "{what}");
                assert_eq!(download(&q), q_values, "{what}: q itself must not change");

                let mut expected_q = q_values.clone();
                cpu::rope::apply_rope(
                    &mut expected_q,
                    q_heads,
                    geometry.head_dim,
                    &positions,
                    &table,
                )
                .unwrap();
                assert_close(&what, &download(&rotated_q), &expected_q, dtype);
                let (expected_k, expected_v) =
                    rope_write_oracle(geometry, (&k_values, &v_values), &slots, &positions, &table);
                assert_pages(
                    &format!("k pages, {what}"),
                    &download(&k_pages),
                    &expected_k,
                    dtype,
                );
                assert_pages(
                    &format!("v pages, {what}"),
                    &download(&v_pages),
                    &expected_v,
                    dtype,
                );
            }
        }
    }
}
