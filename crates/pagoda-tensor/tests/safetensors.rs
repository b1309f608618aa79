//! The safetensors reader against files written here by a minimal writer,
//! including sharded checkpoints and every kind of corruption it must reject.

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use pagoda_tensor::safetensors::SafeTensors;
use pagoda_tensor::{DType, Error, Storage, Tensor};

/// One tensor to write: name, safetensors dtype name, shape, raw bytes.
struct Spec {
    name: &'static str,
    dtype: &'static str,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn spec(name: &'static str, dtype: &'static str, shape: &[usize], bytes: Vec<u8>) -> Spec {
    Spec {
        name,
        dtype,
        shape: shape.to_vec(),
        bytes,
    }
}

/// The bytes of a safetensors file; `pad` extra spaces after the JSON let a
/// test shift the data section off alignment.
fn encode(specs: &[Spec], pad: usize) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0;
    for s in specs {
        let end = offset + s.bytes.len();
        header.insert(
            s.name.into(),
            serde_json::json!({"dtype": s.dtype, "shape": s.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&header).unwrap();
    json.resize(json.len().next_multiple_of(8) + pad, b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    for s in specs {
        out.extend_from_slice(&s.bytes);
    }
    out
}

fn bytes_of<T: bytemuck::Pod>(values: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(values).to_vec()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    // A fresh file rather than an overwrite: ext4 flushes files truncated and
    // rewritten in place on close, which makes the corruption loops crawl.
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn sample_specs() -> Vec<Spec> {
    vec![
        spec(
            "w.f32",
            "F32",
            &[2, 3],
            bytes_of(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]),
        ),
        spec(
            "w.f16",
            "F16",
            &[3],
            bytes_of(&[1.5f32, -2.0, 0.25].map(f16::from_f32)),
        ),
        spec(
            "w.bf16",
            "BF16",
            &[1, 2],
            bytes_of(&[3.0f32, -0.5].map(bf16::from_f32)),
        ),
        spec("ids.u8", "U8", &[4], vec![0, 1, 254, 255]),
        spec("ids.i32", "I32", &[2], bytes_of(&[-7i32, 9])),
        spec("ids.u32", "U32", &[2], bytes_of(&[u32::MAX, 3])),
        spec("scalar", "F32", &[], bytes_of(&[42.0f32])),
        spec("wide", "F64", &[2], bytes_of(&[1.0f64, 2.0])),
    ]
}

fn is_mapped(t: &Tensor) -> bool {
    matches!(t.storage(), Storage::Cpu(cpu) if cpu.is_mapped())
}

fn check_sample(st: &SafeTensors) {
    assert_eq!(
        st.names(),
        [
            "ids.i32", "ids.u32", "ids.u8", "scalar", "w.bf16", "w.f16", "w.f32", "wide"
        ]
    );
    assert!(st.contains("w.f32") && !st.contains("nope"));
    assert_eq!(st.info("w.f32"), Some((DType::F32, &[2usize, 3][..])));
    assert_eq!(st.info("wide"), None);
    assert_eq!(st.file_dtype("wide"), Some("F64"));

    let w = st.get("w.f32").unwrap();
    assert_eq!(w.dims(), &[2, 3]);
    assert_eq!(
        w.as_slice::<f32>().unwrap(),
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    );
    assert_eq!(
        w.transpose(0, 1).unwrap().to_vec::<f32>().unwrap(),
        [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
    );
    assert_eq!(
        st.get("w.f16").unwrap().to_vec_f32().unwrap(),
        [1.5, -2.0, 0.25]
    );
    assert_eq!(
        st.get("w.bf16").unwrap().to_vec::<bf16>().unwrap(),
        [3.0f32, -0.5].map(bf16::from_f32)
    );
    assert_eq!(
        st.get("ids.u8").unwrap().to_vec::<u8>().unwrap(),
        [0, 1, 254, 255]
    );
    assert_eq!(st.get("ids.i32").unwrap().to_vec::<i32>().unwrap(), [-7, 9]);
    assert_eq!(
        st.get("ids.u32").unwrap().to_vec::<u32>().unwrap(),
        [u32::MAX, 3]
    );
    assert_eq!(st.get("scalar").unwrap().dims(), &[] as &[usize]);
    assert_eq!(st.get("scalar").unwrap().to_vec::<f32>().unwrap(), [42.0]);

    let converted = st.get_as("w.f32", DType::BF16).unwrap();
    assert_eq!(converted.dtype(), DType::BF16);
    assert_eq!(
        converted.to_vec_f32().unwrap(),
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    );
    assert_eq!(
        st.get_as("w.f16", DType::F32)
            .unwrap()
            .as_slice::<f32>()
            .unwrap(),
        &[1.5, -2.0, 0.25]
    );

    match st.get("wide").unwrap_err() {
        Error::UnsupportedDType { dtype, context } => {
            assert_eq!(dtype, "F64");
            assert!(context.contains("'wide'"), "{context}");
        }
        other => panic!("unexpected error {other}"),
    }
    match st.get("nope").unwrap_err() {
        Error::MissingTensor { name, .. } => assert_eq!(name, "nope"),
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn reads_every_dtype_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "a.safetensors", &encode(&sample_specs(), 0));
    let st = SafeTensors::open(&path).unwrap();
    check_sample(&st);
    let mut w = st.get("w.f32").unwrap();
    assert!(is_mapped(&w), "aligned data should be read in place");
    assert!(matches!(
        w.as_mut_slice::<f32>(),
        Err(Error::NotMutable { .. })
    ));
}

#[test]
fn misaligned_data_is_copied_once() {
    let dir = tempfile::tempdir().unwrap();
    // One extra header byte puts every 4-byte element at an odd address.
    let path = write(dir.path(), "odd.safetensors", &encode(&sample_specs(), 1));
    let st = SafeTensors::open(&path).unwrap();
    check_sample(&st);
    let mut w = st.get("w.f32").unwrap();
    assert!(!is_mapped(&w));
    assert!(
        st.get("ids.u8").map(|t| is_mapped(&t)).unwrap(),
        "bytes are always aligned"
    );
    w.as_mut_slice::<f32>().unwrap()[0] = 9.0;
    assert_eq!(st.get("w.f32").unwrap().to_vec::<f32>().unwrap()[0], 1.0);
}

#[test]
fn opens_a_single_file_directory() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "model.safetensors", &encode(&sample_specs(), 0));
    let st = SafeTensors::open_dir(dir.path()).unwrap();
    check_sample(&st);
    match st.get("nope").unwrap_err() {
        Error::MissingTensor { file, .. } => assert_eq!(file, dir.path()),
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn opens_shards_named_by_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let mut specs = sample_specs();
    let second = specs.split_off(4);
    write(
        dir.path(),
        "model-00001-of-00002.safetensors",
        &encode(&specs, 0),
    );
    write(
        dir.path(),
        "model-00002-of-00002.safetensors",
        &encode(&second, 3),
    );
    let mut weight_map = serde_json::Map::new();
    for s in &specs {
        weight_map.insert(s.name.into(), "model-00001-of-00002.safetensors".into());
    }
    for s in &second {
        weight_map.insert(s.name.into(), "model-00002-of-00002.safetensors".into());
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    write(
        dir.path(),
        "model.safetensors.index.json",
        index.to_string().as_bytes(),
    );
    // A stray single-file checkpoint must not win over the index.
    write(dir.path(), "model.safetensors", &encode(&[], 0));
    check_sample(&SafeTensors::open_dir(dir.path()).unwrap());

    // An index that puts a tensor in the wrong shard is rejected.
    weight_map.insert("w.f32".into(), "model-00002-of-00002.safetensors".into());
    let index = serde_json::json!({"weight_map": weight_map});
    write(
        dir.path(),
        "model.safetensors.index.json",
        index.to_string().as_bytes(),
    );
    let err = SafeTensors::open_dir(dir.path()).unwrap_err();
    assert!(
        matches!(&err, Error::SafeTensors { message, .. } if message.contains("w.f32")),
        "{err}"
    );

    // A missing shard is an I/O error naming it.
    let index = serde_json::json!({"weight_map": {"x": "model-00009-of-00009.safetensors"}});
    write(
        dir.path(),
        "model.safetensors.index.json",
        index.to_string().as_bytes(),
    );
    let err = SafeTensors::open_dir(dir.path()).unwrap_err();
    assert!(
        matches!(&err, Error::Io { path, .. } if path.ends_with("model-00009-of-00009.safetensors")),
        "{err}"
    );

    write(
        dir.path(),
        "model.safetensors.index.json",
        b"{\"weight_map\": 3}",
    );
    assert!(matches!(
        SafeTensors::open_dir(dir.path()),
        Err(Error::SafeTensors { .. })
    ));
}

#[test]
fn a_directory_without_a_checkpoint_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = SafeTensors::open_dir(dir.path()).unwrap_err();
    assert!(
        matches!(&err, Error::SafeTensors { message, .. } if message.contains("model.safetensors")),
        "{err}"
    );
    let err = SafeTensors::open(&dir.path().join("absent.safetensors")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
}

/// Opens `bytes` as a file and returns the format error's message.
fn open_error(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "bad.safetensors", bytes);
    match SafeTensors::open(&path) {
        Err(Error::SafeTensors { message, path: p }) => {
            assert_eq!(p, path);
            message
        }
        Err(other) => panic!("expected a format error, got {other}"),
        Ok(_) => panic!("corrupt file accepted"),
    }
}

/// A file with a hand-written JSON header.
fn with_header(json: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(data);
    out
}

#[test]
fn rejects_corrupt_files() {
    assert!(open_error(&[1, 2, 3]).contains("too short"));
    assert!(open_error(&[]).contains("too short"));

    let mut huge = encode(&sample_specs(), 0);
    huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(open_error(&huge).contains("header length"));
    let mut max = encode(&sample_specs(), 0);
    max[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(open_error(&max).contains("header length"));

    assert!(open_error(&with_header("{not json", &[])).contains("JSON"));
    assert!(open_error(&with_header("[1, 2]", &[])).contains("JSON"));

    let unknown = with_header(
        r#"{"t": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}"#,
        &[0],
    );
    let message = open_error(&unknown);
    assert!(
        message.contains("Q9") && message.contains("'t'"),
        "{message}"
    );

    let beyond = with_header(
        r#"{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}"#,
        &[0; 4],
    );
    assert!(open_error(&beyond).contains("outside"));
    let reversed = with_header(
        r#"{"t": {"dtype": "U8", "shape": [0], "data_offsets": [3, 2]}}"#,
        &[0; 4],
    );
    assert!(open_error(&reversed).contains("outside"));

    let wrong_size = with_header(
        r#"{"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}"#,
        &[0; 8],
    );
    let message = open_error(&wrong_size);
    assert!(
        message.contains("'t'") && message.contains("8 bytes"),
        "{message}"
    );
    let overflow = with_header(
        r#"{"t": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]}}"#,
        &[0; 8],
    );
    assert!(open_error(&overflow).contains("'t'"));

    let malformed = with_header(
        r#"{"t": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}"#,
        &[0; 8],
    );
    assert!(open_error(&malformed).contains("malformed"));

    // Unsupported-but-valid dtypes are validated too.
    let wide = with_header(
        r#"{"t": {"dtype": "I64", "shape": [2], "data_offsets": [0, 8]}}"#,
        &[0; 8],
    );
    assert!(open_error(&wide).contains("'t'"));
}

#[test]
fn every_truncation_is_rejected_without_panicking() {
    let bytes = encode(&sample_specs(), 0);
    let dir = tempfile::tempdir().unwrap();
    for cut in 0..bytes.len() {
        let path = write(dir.path(), "cut.safetensors", &bytes[..cut]);
        assert!(
            SafeTensors::open(&path).is_err(),
            "accepted a file cut at {cut} of {}",
            bytes.len()
        );
    }
}
