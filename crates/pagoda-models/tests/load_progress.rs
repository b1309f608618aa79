//! Load progress: the events of a load start at zero, never go back, count every tensor the
//! model reads, and end at the checkpoint's size - for safetensors (one file or sharded), GGUF
//! (block-quantized tensors included) and quantization on load.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use half::f16;
use pagoda_models::{
    LoadEvent, LoadOptions, LoadProgress, Model, Nf4Options, Quantization, load_model,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Loads `path` and returns the model with every event the load sent.
fn load_recording(path: &Path, options: LoadOptions) -> (Box<dyn Model>, Vec<LoadEvent>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let options = LoadOptions {
        progress: Some(LoadProgress::new(move |event| {
            sink.lock().unwrap().push(event)
        })),
        ..options
    };
    let model =
        load_model(path, &options).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
    let events = events.lock().unwrap().clone();
    (model, events)
}

/// Checks the shape every load's events must have and returns the checkpoint size they report.
fn check_events(events: &[LoadEvent], tensors: usize) -> u64 {
    let first = events.first().expect("at least one event");
    let last = events.last().expect("at least one event");
    assert_eq!((first.bytes_done, first.tensors_done), (0, 0), "{first:?}");
    assert!(last.is_done(), "{last:?}");
    assert_eq!(last.tensors_total, tensors);
    for pair in events.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        assert_eq!(
            (a.bytes_total, a.tensors_total),
            (b.bytes_total, b.tensors_total)
        );
        assert!(
            b.bytes_done >= a.bytes_done && b.tensors_done >= a.tensors_done,
            "{a:?} then {b:?}"
        );
        assert!(b.bytes_done <= b.bytes_total && b.tensors_done <= b.tensors_total);
    }
    // Only the first and last events are not about a tensor just placed: the rest report
    // progress, and no tensor is reported twice.
    assert!(
        events[1..events.len() - 1]
            .windows(2)
            .all(|pair| pair[1].tensors_done > pair[0].tensors_done)
    );
    assert!(events.iter().filter(|e| e.is_done()).count() <= 2);
    last.bytes_total
}

/// The tensor bytes of safetensors files: each is an 8-byte header length, the JSON header,
/// then the tensors' data with nothing in between (huggingface/safetensors' format).
fn safetensors_data_bytes(dir: &Path) -> (u64, usize) {
    let mut bytes = 0;
    let mut tensors = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let file = std::fs::read(&path).unwrap();
        let header_len = u64::from_le_bytes(file[..8].try_into().unwrap());
        bytes += file.len() as u64 - 8 - header_len;
        let header: serde_json::Value =
            serde_json::from_slice(&file[8..8 + header_len as usize]).unwrap();
        tensors += header
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "__metadata__")
            .count();
    }
    (bytes, tensors)
}

#[test]
fn safetensors_loads_report_every_byte_in_order() {
    // tiny-llama is sharded in five files, the others are one file; tiny-llama-tied reads its
    // embedding twice.
    for name in ["tiny-llama", "tiny-llama-tied", "tiny-gpt-neox"] {
        let dir = fixture(name);
        let (bytes, tensors) = safetensors_data_bytes(&dir);
        let (_, events) = load_recording(&dir, LoadOptions::default());
        assert_eq!(check_events(&events, tensors), bytes, "{name}");
        // A tensor is placed at a time, not the whole model at the end.
        assert!(
            events.len() > tensors / 2,
            "{name}: {} events",
            events.len()
        );
        if name.starts_with("tiny-llama") {
            // Llama reads every tensor it stores: the count reaches the total before the end.
            assert!(events[events.len() - 2].is_done(), "{name}");
        }
    }
}

#[test]
fn quantizing_on_load_reports_the_same_checkpoint_bytes() {
    let dir = fixture("tiny-llama");
    let (bytes, tensors) = safetensors_data_bytes(&dir);
    let options = LoadOptions {
        quantize: Some(Quantization::Nf4(Nf4Options {
            block_size: 64,
            ..Nf4Options::default()
        })),
        ..LoadOptions::default()
    };
    let (model, events) = load_recording(&dir, options);
    assert_eq!(check_events(&events, tensors), bytes);
    // The placed model is smaller than the checkpoint: progress counts what was read.
    assert!((model.info().weight_bytes as u64) < bytes);
}

#[test]
fn a_failed_load_sends_no_last_event() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture("tiny-llama-tied")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["num_hidden_layers"] = serde_json::json!(3);
    std::fs::write(&config_path, config.to_string()).unwrap();

    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let options = LoadOptions {
        progress: Some(LoadProgress::new(move |event| {
            sink.lock().unwrap().push(event)
        })),
        ..LoadOptions::default()
    };
    assert!(load_model(dir.path(), &options).is_err());
    let events = events.lock().unwrap();
    assert!(!events.is_empty());
    assert!(events.iter().all(|e| !e.is_done()), "{events:?}");
}

/// A GGUF tensor to write: row-major dims and encoded data.
struct GgufTensor {
    name: String,
    dims: Vec<usize>,
    type_id: u32,
    data: Vec<u8>,
}

/// GGUF type ids and block layouts (ggml/docs/gguf.md): F32, F16, and Q8_0 (blocks of 32
/// elements: an f16 scale then 32 signed bytes).
const F32: u32 = 0;
const F16: u32 = 1;
const Q8_0: u32 = 8;

/// `count` deterministic values in [-0.5, 0.5) (64-bit LCG, high bits).
fn values(seed: u64, count: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn tensor(name: &str, dims: &[usize], type_id: u32) -> GgufTensor {
    let seed = name
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    let v = values(seed, dims.iter().product());
    let data = match type_id {
        F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        F16 => v
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect(),
        Q8_0 => v
            .chunks(32)
            .flat_map(|block| {
                let max = block.iter().fold(0f32, |m, x| m.max(x.abs()));
                let scale = max / 127.0;
                let mut out = f16::from_f32(scale).to_le_bytes().to_vec();
                out.extend(
                    block
                        .iter()
                        .map(|x| (x / scale).round().clamp(-127.0, 127.0) as i8 as u8),
                );
                out
            })
            .collect(),
        _ => unreachable!("only F32, F16 and Q8_0 are written"),
    };
    GgufTensor {
        name: name.into(),
        dims: dims.to_vec(),
        type_id,
        data,
    }
}

/// A two-layer Llama in GGUF: Q8_0 projections, an f16 embedding, f32 norms, untied output.
fn tiny_gguf_llama(path: &Path) -> (u64, usize) {
    let (hidden, heads, kv_heads, head_dim, ffn, layers, vocab) = (64, 4, 2, 16, 128, 2, 96);
    let mut tensors = vec![
        tensor("token_embd.weight", &[vocab, hidden], F16),
        tensor("output_norm.weight", &[hidden], F32),
        tensor("output.weight", &[vocab, hidden], Q8_0),
    ];
    for l in 0..layers {
        let name = |part: &str| format!("blk.{l}.{part}.weight");
        tensors.extend([
            tensor(&name("attn_norm"), &[hidden], F32),
            tensor(&name("attn_q"), &[heads * head_dim, hidden], Q8_0),
            tensor(&name("attn_k"), &[kv_heads * head_dim, hidden], Q8_0),
            tensor(&name("attn_v"), &[kv_heads * head_dim, hidden], Q8_0),
            tensor(&name("attn_output"), &[hidden, heads * head_dim], Q8_0),
            tensor(&name("ffn_norm"), &[hidden], F32),
            tensor(&name("ffn_gate"), &[ffn, hidden], Q8_0),
            tensor(&name("ffn_up"), &[ffn, hidden], Q8_0),
            tensor(&name("ffn_down"), &[hidden, ffn], Q8_0),
        ]);
    }
    let metadata: Vec<(&str, u32)> = vec![
        ("llama.embedding_length", hidden as u32),
        ("llama.attention.head_count", heads as u32),
        ("llama.attention.head_count_kv", kv_heads as u32),
        ("llama.feed_forward_length", ffn as u32),
        ("llama.block_count", layers as u32),
        ("llama.context_length", 64),
    ];
    write_gguf(path, &metadata, &tensors);
    let bytes = tensors.iter().map(|t| t.data.len() as u64).sum();
    (bytes, tensors.len())
}

/// A GGUF v3 file (ggml/docs/gguf.md): magic, version, tensor and metadata counts, metadata
/// (`general.architecture` then u32 values), the tensor table (dims innermost first), then the
/// data section at the default 32-byte alignment.
fn write_gguf(path: &Path, metadata: &[(&str, u32)], tensors: &[GgufTensor]) {
    const ALIGNMENT: usize = 32;
    let string = |out: &mut Vec<u8>, s: &str| {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    };
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64 + 1).to_le_bytes());
    string(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes());
    string(&mut out, "llama");
    for (key, value) in metadata {
        string(&mut out, key);
        out.extend(4u32.to_le_bytes());
        out.extend(value.to_le_bytes());
    }
    let mut offsets = Vec::new();
    let mut offset = 0;
    for t in tensors {
        string(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        for d in t.dims.iter().rev() {
            out.extend((*d as u64).to_le_bytes());
        }
        out.extend(t.type_id.to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.data.len()).next_multiple_of(ALIGNMENT);
    }
    let data_start = out.len().next_multiple_of(ALIGNMENT);
    for (t, offset) in tensors.iter().zip(offsets) {
        out.resize(data_start + offset, 0);
        out.extend(&t.data);
    }
    std::fs::write(path, out).unwrap();
}

#[test]
fn gguf_loads_report_the_packed_bytes_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-llama.gguf");
    let (bytes, tensors) = tiny_gguf_llama(&path);
    for options in [
        LoadOptions::default(),
        LoadOptions {
            quantize: Some(Quantization::Nf4(Nf4Options::default())),
            ..LoadOptions::default()
        },
    ] {
        let (model, events) = load_recording(&path, options);
        assert_eq!(model.info().vocab_size, 96);
        assert_eq!(check_events(&events, tensors), bytes);
        assert!(events[events.len() - 2].is_done());
        assert!(events.len() > tensors / 2);
    }
}
