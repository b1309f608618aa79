//! The GGUF reader against files written here by a minimal writer: metadata of
//! every type, Q8_0/Q4_0/Q4_1/F16/BF16/F32 tensors compared with a naive
//! dequantization, and corrupt files that must be rejected without a panic.

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use pagoda_tensor::gguf::{GgmlType, GgufFile, GgufValue};
use pagoda_tensor::{DType, Error, Storage};

/// A deterministic byte stream (64-bit LCG, high bits).
struct Rng(u64);

impl Rng {
    fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 32) as u32
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u32() as u8).collect()
    }
    /// A small f16 scale, possibly negative.
    fn scale(&mut self) -> [u8; 2] {
        let unit = self.next_u32() as f32 / u32::MAX as f32;
        f16::from_f32((unit - 0.5) * 0.2).to_le_bytes()
    }
}

struct TensorSpec {
    name: String,
    /// Row-major dims; the writer stores them reversed, as ggml does.
    dims: Vec<u64>,
    type_id: u32,
    data: Vec<u8>,
}

fn value_type(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(items) => {
            out.extend_from_slice(&items.first().map_or(0, value_type).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
    }
}

/// The bytes of a GGUF file; tensor data is laid out in order at `alignment`.
fn encode(
    version: u32,
    metadata: &[(&str, GgufValue)],
    tensors: &[TensorSpec],
    alignment: usize,
) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_str(&mut out, key);
        out.extend_from_slice(&value_type(value).to_le_bytes());
        put_value(&mut out, value);
    }
    let mut offset = 0usize;
    let mut offsets = Vec::new();
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in t.dims.iter().rev() {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.type_id.to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.data.len()).next_multiple_of(alignment);
    }
    let data_start = out.len().next_multiple_of(alignment);
    for (t, off) in tensors.iter().zip(offsets) {
        out.resize(data_start + off, 0);
        out.extend_from_slice(&t.data);
    }
    out
}

/// `rows x cols` elements of the 32-element block type `type_id` with random contents.
fn quantized(rng: &mut Rng, name: &str, type_id: u32, rows: usize, cols: usize) -> TensorSpec {
    let blocks = rows * cols / 32;
    let mut data = Vec::new();
    for _ in 0..blocks {
        match type_id {
            8 => {
                data.extend_from_slice(&rng.scale());
                data.extend(rng.bytes(32));
            }
            2 => {
                data.extend_from_slice(&rng.scale());
                data.extend(rng.bytes(16));
            }
            3 => {
                data.extend_from_slice(&rng.scale());
                data.extend_from_slice(&rng.scale());
                data.extend(rng.bytes(16));
            }
            _ => unreachable!("test helper only writes Q8_0, Q4_0, Q4_1"),
        }
    }
    TensorSpec {
        name: name.into(),
        dims: vec![rows as u64, cols as u64],
        type_id,
        data,
    }
}

/// Dequantization written straight from the format description, element by element.
fn naive_dequant(type_id: u32, data: &[u8]) -> Vec<f32> {
    let half_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    let (block_bytes, mut out) = match type_id {
        8 => (34, Vec::new()),
        2 => (18, Vec::new()),
        3 => (20, Vec::new()),
        _ => unreachable!(),
    };
    for block in data.chunks(block_bytes) {
        let d = half_at(block, 0);
        for i in 0..32 {
            let v = match type_id {
                8 => block[2 + i] as i8 as f32 * d,
                2 => {
                    let byte = block[2 + i % 16];
                    let q = if i < 16 { byte & 0xF } else { byte >> 4 };
                    (q as f32 - 8.0) * d
                }
                _ => {
                    let m = half_at(block, 2);
                    let byte = block[4 + i % 16];
                    let q = if i < 16 { byte & 0xF } else { byte >> 4 };
                    q as f32 * d + m
                }
            };
            out.push(v);
        }
    }
    out
}

fn sample_metadata() -> Vec<(&'static str, GgufValue)> {
    vec![
        ("general.architecture", GgufValue::String("llama".into())),
        ("u8", GgufValue::U8(200)),
        ("i8", GgufValue::I8(-100)),
        ("u16", GgufValue::U16(60000)),
        ("i16", GgufValue::I16(-30000)),
        ("u32", GgufValue::U32(4_000_000_000)),
        ("i32", GgufValue::I32(-5)),
        ("u64", GgufValue::U64(1 << 40)),
        ("i64", GgufValue::I64(-(1 << 40))),
        ("f32", GgufValue::F32(1e-5)),
        ("f64", GgufValue::F64(0.125)),
        ("bool", GgufValue::Bool(true)),
        (
            "tokens",
            GgufValue::Array(vec![
                GgufValue::String("<s>".into()),
                GgufValue::String("héllo".into()),
            ]),
        ),
        (
            "nested",
            GgufValue::Array(vec![
                GgufValue::Array(vec![GgufValue::I32(1), GgufValue::I32(2)]),
                GgufValue::Array(vec![GgufValue::I32(3)]),
            ]),
        ),
        ("empty", GgufValue::Array(vec![])),
    ]
}

fn sample_tensors(rng: &mut Rng) -> Vec<TensorSpec> {
    let f32s: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 3.0).collect();
    let f16s: Vec<f16> = (0..8).map(|i| f16::from_f32(i as f32 - 4.5)).collect();
    let bf16s: Vec<bf16> = (0..6).map(|i| bf16::from_f32(i as f32 * 1.25)).collect();
    vec![
        quantized(rng, "q8", 8, 3, 64),
        quantized(rng, "q4_0", 2, 2, 96),
        quantized(rng, "q4_1", 3, 4, 32),
        TensorSpec {
            name: "f32".into(),
            dims: vec![3, 4],
            type_id: 0,
            data: bytemuck::cast_slice(&f32s).to_vec(),
        },
        TensorSpec {
            name: "f16".into(),
            dims: vec![2, 2, 2],
            type_id: 1,
            data: bytemuck::cast_slice(&f16s).to_vec(),
        },
        TensorSpec {
            name: "bf16".into(),
            dims: vec![6],
            type_id: 30,
            data: bytemuck::cast_slice(&bf16s).to_vec(),
        },
        // Q4_K: recognised but not decoded; 256-element blocks of 144 bytes.
        TensorSpec {
            name: "q4k".into(),
            dims: vec![1, 256],
            type_id: 12,
            data: vec![0; 144],
        },
    ]
}

fn write(dir: &Path, bytes: &[u8]) -> PathBuf {
    let path = dir.join("model.gguf");
    // A fresh file rather than an overwrite: ext4 flushes files truncated and
    // rewritten in place on close, which makes the corruption loops crawl.
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn reads_metadata_of_every_type() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(1);
    let path = write(
        dir.path(),
        &encode(3, &sample_metadata(), &sample_tensors(&mut rng), 32),
    );
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.version(), 3);
    for (key, value) in sample_metadata() {
        assert_eq!(file.get(key), Some(&value), "{key}");
    }
    assert_eq!(file.metadata().len(), sample_metadata().len());
    assert_eq!(
        file.get("general.architecture").and_then(GgufValue::as_str),
        Some("llama")
    );
    assert_eq!(file.get("u8").and_then(GgufValue::as_u32), Some(200));
    assert_eq!(file.get("i32").and_then(GgufValue::as_u32), None);
    assert_eq!(
        file.get("u32").and_then(GgufValue::as_u64),
        Some(4_000_000_000)
    );
    assert_eq!(file.get("f32").and_then(GgufValue::as_f32), Some(1e-5));
    assert_eq!(file.get("bool").and_then(GgufValue::as_bool), Some(true));
    let nested = file.get("nested").and_then(GgufValue::as_array).unwrap();
    assert_eq!(nested[1].as_array().unwrap()[0].as_u32(), Some(3));
    assert_eq!(file.alignment(), 32);
    assert_eq!(file.data_offset() % 32, 0);
}

#[test]
fn dequantizes_like_the_naive_formula() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(7);
    let tensors = sample_tensors(&mut rng);
    // v2 and a non-default alignment exercise the other layout rules.
    for (version, alignment) in [(3, 32), (2, 64)] {
        let mut metadata = sample_metadata();
        if alignment != 32 {
            metadata.push(("general.alignment", GgufValue::U32(alignment as u32)));
        }
        let path = write(dir.path(), &encode(version, &metadata, &tensors, alignment));
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.version(), version);
        assert_eq!(file.alignment(), alignment);
        assert_eq!(file.tensor_infos().len(), tensors.len());

        for spec in &tensors[..3] {
            let info = file.tensor_info(&spec.name).unwrap();
            assert_eq!(
                info.dims,
                spec.dims.iter().map(|&d| d as usize).collect::<Vec<_>>()
            );
            assert_eq!(info.ggml_type, GgmlType::from_id(spec.type_id));
            let expected = naive_dequant(spec.type_id, &spec.data);
            let t = file.tensor(&spec.name, DType::F32).unwrap();
            assert_eq!(t.dims(), info.dims.as_slice());
            assert_eq!(
                t.as_slice::<f32>().unwrap(),
                expected.as_slice(),
                "{} v{version}",
                spec.name
            );
            let as_f16 = file
                .tensor(&spec.name, DType::F16)
                .unwrap()
                .to_vec::<f16>()
                .unwrap();
            assert_eq!(
                as_f16,
                expected
                    .iter()
                    .map(|&x| f16::from_f32(x))
                    .collect::<Vec<_>>()
            );
            let as_bf16 = file
                .tensor(&spec.name, DType::BF16)
                .unwrap()
                .to_vec::<bf16>()
                .unwrap();
            assert_eq!(
                as_bf16,
                expected
                    .iter()
                    .map(|&x| bf16::from_f32(x))
                    .collect::<Vec<_>>()
            );
        }

        let f = file.tensor("f32", DType::F32).unwrap();
        assert!(
            matches!(f.storage(), Storage::Cpu(cpu) if cpu.is_mapped()),
            "F32 read in place"
        );
        assert_eq!(f.dims(), &[3, 4]);
        assert_eq!(
            f.to_vec::<f32>().unwrap(),
            (0..12).map(|i| i as f32 * 0.5 - 3.0).collect::<Vec<_>>()
        );
        let h = file.tensor("f16", DType::F16).unwrap();
        assert!(
            matches!(h.storage(), Storage::Cpu(cpu) if cpu.is_mapped()),
            "F16 read in place"
        );
        assert_eq!(h.dims(), &[2, 2, 2]);
        assert_eq!(
            file.tensor("f16", DType::F32)
                .unwrap()
                .to_vec::<f32>()
                .unwrap(),
            [-4.5, -3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5]
        );
        assert_eq!(
            file.tensor("bf16", DType::F32)
                .unwrap()
                .to_vec::<f32>()
                .unwrap(),
            [0.0, 1.25, 2.5, 3.75, 5.0, 6.25]
        );
        assert_eq!(
            file.tensor("f32", DType::BF16)
                .unwrap()
                .to_vec_f32()
                .unwrap()[..3],
            [-3.0, -2.5, -2.0]
        );

        match file.tensor("q4k", DType::F32).unwrap_err() {
            Error::UnsupportedDType { dtype, context } => {
                assert_eq!(dtype, "Q4_K");
                assert!(context.contains("'q4k'"), "{context}");
            }
            other => panic!("unexpected error {other}"),
        }
        assert!(matches!(
            file.tensor("q8", DType::U32),
            Err(Error::UnsupportedDType { .. })
        ));
        assert!(matches!(
            file.tensor("nope", DType::F32),
            Err(Error::MissingTensor { .. })
        ));
    }
}

#[test]
fn large_tensors_dequantize_across_tasks() {
    // Enough blocks for several rayon tasks, with a ragged last task.
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(3);
    let tensors = vec![
        quantized(&mut rng, "big", 2, 300, 96),
        quantized(&mut rng, "big1", 3, 257, 32),
    ];
    let file = GgufFile::open(&write(dir.path(), &encode(3, &[], &tensors, 32))).unwrap();
    for spec in &tensors {
        let got = file
            .tensor(&spec.name, DType::F32)
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(got, naive_dequant(spec.type_id, &spec.data));
    }
}

fn open_error(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), bytes);
    match GgufFile::open(&path) {
        Err(Error::Gguf { message, .. }) => message,
        Err(other) => panic!("expected a GGUF format error, got {other}"),
        Ok(_) => panic!("corrupt file accepted"),
    }
}

fn one_tensor(dims: Vec<u64>, type_id: u32, data: Vec<u8>) -> Vec<u8> {
    encode(
        3,
        &[],
        &[TensorSpec {
            name: "t".into(),
            dims,
            type_id,
            data,
        }],
        32,
    )
}

#[test]
fn rejects_corrupt_headers() {
    let mut rng = Rng(5);
    let good = encode(3, &sample_metadata(), &sample_tensors(&mut rng), 32);

    let mut bad_magic = good.clone();
    bad_magic[..4].copy_from_slice(b"GGML");
    assert!(open_error(&bad_magic).contains("magic"));
    let mut v1 = good.clone();
    v1[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(open_error(&v1).contains("version 1"));
    let mut v4 = good.clone();
    v4[4..8].copy_from_slice(&4u32.to_le_bytes());
    assert!(open_error(&v4).contains("version 4"));
    let mut big_endian = good.clone();
    big_endian[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(open_error(&big_endian).contains("big-endian"));

    let mut many_tensors = good.clone();
    many_tensors[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(open_error(&many_tensors).contains("tensor count"));
    let mut many_keys = good.clone();
    many_keys[16..24].copy_from_slice(&(1u64 << 50).to_le_bytes());
    assert!(open_error(&many_keys).contains("metadata count"));

    // The first key's length.
    let mut long_key = good.clone();
    long_key[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
    assert!(open_error(&long_key).contains("length of key"));

    let long_array = {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        out.extend_from_slice(&1u64.to_le_bytes());
        put_str(&mut out, "a");
        out.extend_from_slice(&9u32.to_le_bytes());
        out.extend_from_slice(&4u32.to_le_bytes());
        out.extend_from_slice(&(1u64 << 40).to_le_bytes());
        out
    };
    assert!(open_error(&long_array).contains("element count of metadata 'a'"));

    let bad_type = encode(3, &[], &[], 32)
        .into_iter()
        .take(16)
        .chain(1u64.to_le_bytes())
        .chain({
            let mut kv = Vec::new();
            put_str(&mut kv, "k");
            kv.extend_from_slice(&13u32.to_le_bytes());
            kv.extend_from_slice(&[0; 8]);
            kv
        })
        .collect::<Vec<u8>>();
    assert!(open_error(&bad_type).contains("unknown value type 13"));

    let deep = {
        let mut v = GgufValue::U8(1);
        for _ in 0..40 {
            v = GgufValue::Array(vec![v]);
        }
        encode(3, &[("deep", v)], &[], 32)
    };
    assert!(open_error(&deep).contains("nested"));

    let odd_alignment = encode(3, &[("general.alignment", GgufValue::U32(48))], &[], 32);
    assert!(open_error(&odd_alignment).contains("power of two"));
    let string_alignment = encode(
        3,
        &[("general.alignment", GgufValue::String("32".into()))],
        &[],
        32,
    );
    assert!(open_error(&string_alignment).contains("power of two"));

    let mut bad_bool = encode(3, &[("b", GgufValue::Bool(true))], &[], 32);
    let last = bad_bool.len() - 1;
    bad_bool[last] = 2;
    assert!(open_error(&bad_bool).contains("bool"));

    let invalid_utf8 = {
        let mut out = encode(3, &[("s", GgufValue::String("ab".into()))], &[], 32);
        let last = out.len() - 1;
        out[last] = 0xFF;
        out
    };
    assert!(open_error(&invalid_utf8).contains("UTF-8"));
}

#[test]
fn rejects_bad_tensor_tables() {
    let row = one_tensor(vec![2, 33], 8, vec![0; 2 * 34]);
    let message = open_error(&row);
    assert!(
        message.contains("'t'") && message.contains("multiple of the Q8_0 block size 32"),
        "{message}"
    );

    let short = one_tensor(vec![2, 32], 8, vec![0; 34]);
    let message = open_error(&short);
    assert!(
        message.contains("'t'") && message.contains("beyond the end"),
        "{message}"
    );

    let unknown = one_tensor(vec![4], 99, vec![0; 16]);
    assert!(open_error(&unknown).contains("unknown ggml type 99"));

    let five_dims = one_tensor(vec![1, 1, 1, 1, 1], 0, vec![0; 4]);
    assert!(open_error(&five_dims).contains("5 dimensions"));

    let overflow = one_tensor(vec![1 << 40, 1 << 40], 0, vec![0; 4]);
    assert!(open_error(&overflow).contains("overflow"));

    let mut misplaced = one_tensor(vec![4], 0, vec![0; 16]);
    // The tensor's offset field sits just before the padding that precedes the data.
    let table_end = 24 + 8 + 1 + 4 + 8 + 4 + 8;
    misplaced[table_end - 8..table_end].copy_from_slice(&4u64.to_le_bytes());
    assert!(open_error(&misplaced).contains("alignment"));
    misplaced[table_end - 8..table_end].copy_from_slice(&u64::MAX.to_le_bytes().map(|b| b & 0xE0));
    assert!(open_error(&misplaced).contains("beyond the end"));

    let twice = encode(
        3,
        &[],
        &[
            TensorSpec {
                name: "t".into(),
                dims: vec![1],
                type_id: 0,
                data: vec![0; 4],
            },
            TensorSpec {
                name: "t".into(),
                dims: vec![1],
                type_id: 0,
                data: vec![0; 4],
            },
        ],
        32,
    );
    assert!(open_error(&twice).contains("twice"));
}

#[test]
fn every_truncation_is_rejected_without_panicking() {
    let mut rng = Rng(9);
    let bytes = encode(3, &sample_metadata(), &sample_tensors(&mut rng)[..4], 32);
    let dir = tempfile::tempdir().unwrap();
    for cut in 0..bytes.len() {
        let path = write(dir.path(), &bytes[..cut]);
        match GgufFile::open(&path) {
            Err(Error::Gguf { .. }) => {}
            Err(other) => panic!("cut at {cut}: unexpected error kind {other}"),
            Ok(_) => panic!("accepted a file cut at {cut} of {}", bytes.len()),
        }
    }
}

#[test]
fn random_corruption_never_panics() {
    let mut rng = Rng(11);
    let good = encode(3, &sample_metadata(), &sample_tensors(&mut rng), 32);
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..500 {
        let mut bytes = good.clone();
        for _ in 0..1 + rng.next_u32() % 4 {
            // Corrupt the header and table, where the structure lives.
            let at = rng.next_u32() as usize % 600.min(bytes.len());
            bytes[at] = rng.next_u32() as u8;
        }
        let path = write(dir.path(), &bytes);
        if let Ok(file) = GgufFile::open(&path) {
            for info in file.tensor_infos() {
                let _ = file.tensor(&info.name, DType::F32);
            }
        }
    }
}

/// Cross-checks a real checkpoint when `PAGODA_SMOLLM2_GGUF` points to
/// SmolLM2-135M-Instruct.Q4_1.gguf; the expected values were read with the
/// `gguf` Python package (`GGUFReader` + `gguf.quants.dequantize`).
#[test]
fn smollm2_checkpoint() {
    let Some(path) = std::env::var_os("PAGODA_SMOLLM2_GGUF") else {
        eprintln!("skipping: set PAGODA_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf to run");
        return;
    };
    let file = GgufFile::open(Path::new(&path)).unwrap();
    check_smollm2(&file);
}

fn check_smollm2(file: &GgufFile) {
    assert_eq!(file.version(), 3);
    assert_eq!(file.alignment(), 32);
    assert_eq!(file.data_offset(), 1_785_664);
    assert_eq!(file.tensor_infos().len(), 272);
    assert_eq!(file.metadata().len(), 33);
    assert_eq!(
        file.get("general.architecture").and_then(GgufValue::as_str),
        Some("llama")
    );
    assert_eq!(
        file.get("llama.block_count").and_then(GgufValue::as_u32),
        Some(30)
    );
    assert_eq!(
        file.get("llama.rope.freq_base").and_then(GgufValue::as_f32),
        Some(100000.0)
    );
    let tokens = file
        .get("tokenizer.ggml.tokens")
        .and_then(GgufValue::as_array)
        .unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(tokens[2].as_str(), Some("<|im_end|>"));

    // (name, type, dims, [(row, col, value)], sum, sum of |x|)
    type Check = (
        &'static str,
        GgmlType,
        [usize; 2],
        &'static [(usize, usize, f32)],
        f64,
        f64,
    );
    let checks: [Check; 3] = [
        (
            "token_embd.weight",
            GgmlType::Q8_0,
            [49152, 576],
            &[
                (0, 0, -0.106_544_495),
                (0, 1, 0.032_978_058),
                (1, 33, 0.180_831_91),
                (49151, 575, -0.041_702_27),
                (12345, 300, -0.107_906_34),
            ],
            -15_353.044_494_152_07,
            2_802_153.619_805_813,
        ),
        (
            "blk.0.ffn_down.weight",
            GgmlType::Q4_1,
            [576, 1536],
            &[
                (0, 0, -0.330_810_55),
                (0, 17, -0.601_562_5),
                (575, 1535, -0.181_365_97),
                (100, 1000, -0.046_722_412),
            ],
            150.635_772_705_078_12,
            128_458.062_866_210_94,
        ),
        (
            "blk.29.attn_v.weight",
            GgmlType::Q4_1,
            [192, 576],
            &[
                (0, 0, 0.141_723_63),
                (191, 575, 0.053_222_656),
                (50, 31, -0.244_873_05),
            ],
            -23.565_185_546_875,
            24_516.714_843_75,
        ),
    ];
    for (name, ggml_type, dims, points, sum, abs_sum) in checks {
        let info = file.tensor_info(name).unwrap();
        assert_eq!(info.ggml_type, ggml_type, "{name}");
        assert_eq!(info.dims, dims, "{name}");
        let t = file.tensor(name, DType::F32).unwrap();
        let values = t.as_slice::<f32>().unwrap();
        for &(row, col, expected) in points {
            assert_eq!(
                values[row * dims[1] + col],
                expected,
                "{name}[{row}, {col}]"
            );
        }
        let total: f64 = values.iter().map(|&v| f64::from(v)).sum();
        let total_abs: f64 = values.iter().map(|&v| f64::from(v).abs()).sum();
        assert!((total - sum).abs() < 1e-3, "{name}: sum {total} vs {sum}");
        assert!(
            (total_abs - abs_sum).abs() < 1e-3,
            "{name}: sum of |x| {total_abs} vs {abs_sum}"
        );
    }
    let norm = file.tensor("blk.0.attn_norm.weight", DType::F32).unwrap();
    assert!(matches!(norm.storage(), Storage::Cpu(cpu) if cpu.is_mapped()));
    let norm = norm.to_vec::<f32>().unwrap();
    let bits = [norm[0], norm[1], norm[575]].map(f32::to_bits);
    assert_eq!(bits, [0x3c65_0000, 0x3cc3_0000, 0xbd1d_0000]);
    let out_norm = file
        .tensor("output_norm.weight", DType::BF16)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    assert_eq!((out_norm[0], out_norm[575]), (1.757_812_5, 1.984_375));
}
