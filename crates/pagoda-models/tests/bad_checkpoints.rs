//! A broken checkpoint fails to load with an error that names what is wrong, never a panic.

use std::path::{Path, PathBuf};

use pagoda_models::{Error, LoadOptions, load_model};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A copy of a fixture checkpoint whose config.json has `edit` applied.
fn edited_copy(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&config_path, config.to_string()).unwrap();
    dir
}

fn load_error(path: &Path) -> Error {
    match load_model(path, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e,
    }
}

#[test]
fn unknown_architecture_is_named() {
    let dir = edited_copy("tiny-llama-tied", |c| {
        c["architectures"] = serde_json::json!(["MambaForCausalLM"])
    });
    let error = load_error(dir.path());
    assert!(
        matches!(&error, Error::UnknownArchitecture(a) if a == "MambaForCausalLM"),
        "{error}"
    );
}

#[test]
fn mis_shaped_tensor_is_named_with_both_shapes() {
    let dir = edited_copy("tiny-llama-tied", |c| {
        c["intermediate_size"] = serde_json::json!(100)
    });
    let message = load_error(dir.path()).to_string();
    assert!(
        message.contains("model.layers.0.mlp.gate_proj.weight"),
        "{message}"
    );
    assert!(
        message.contains("[100, 48]") && message.contains("[96, 48]"),
        "{message}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = edited_copy("tiny-gpt-neox", |c| {
        c["num_hidden_layers"] = serde_json::json!(3)
    });
    let message = load_error(dir.path()).to_string();
    assert!(message.contains("gpt_neox.layers.2."), "{message}");
}

#[test]
fn missing_lm_head_of_an_untied_model_is_named() {
    let dir = edited_copy("tiny-llama-tied", |c| {
        c["tie_word_embeddings"] = serde_json::json!(false)
    });
    let message = load_error(dir.path()).to_string();
    assert!(message.contains("lm_head.weight"), "{message}");
}

#[test]
fn truncated_weights_are_reported() {
    let dir = edited_copy("tiny-llama-tied", |_| {});
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let message = load_error(dir.path()).to_string();
    assert!(message.contains("model.safetensors"), "{message}");
}

#[test]
fn missing_config_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let message = load_error(dir.path()).to_string();
    assert!(message.contains("config.json"), "{message}");
    let nowhere = dir.path().join("no-such-model");
    assert!(matches!(load_error(&nowhere), Error::Io { .. }));
}
