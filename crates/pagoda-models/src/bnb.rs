//! Weights that bitsandbytes saved in 4 bits: a transformers checkpoint written after loading with
//! `load_in_4bit` (a `bnb.nn.Linear4bit` per linear layer).
//!
//! `Linear4bit._save_to_state_dict` stores a layer's weight `{name}` (for instance
//! `model.layers.0.mlp.down_proj.weight`) as the packed codes, uint8 `[(rows * cols + 1) / 2, 1]`,
//! and beside it the quantization state of `QuantState.as_dict(packed=True)`:
//! - `{name}.absmax`: the block scales, f32 - or uint8 codes when the scales are double-quantized;
//! - `{name}.quant_map`: the 16-entry code, f32 (NF4 here; FP4 is refused);
//! - `{name}.nested_absmax`, `{name}.nested_quant_map`: the second level's scales (f32, one per
//!   256 blocks) and 8-bit code (f32 `[256]`), when double-quantized;
//! - `{name}.quant_state.bitsandbytes__nf4`: uint8 bytes of a JSON object with the rest:
//!   `quant_type`, `blocksize`, `dtype` (of the original weight), `shape`, and when
//!   double-quantized `nested_blocksize`, `nested_dtype` and `nested_offset`.
//!
//! `config.json` carries `quantization_config` (`quant_method: "bitsandbytes"`, `load_in_4bit`,
//! `bnb_4bit_quant_type`, ...); the tensors themselves say which layers are quantized (those in
//! `llm_int8_skip_modules`, and the lm_head, are stored dense).

use pagoda_kernels::cpu::nf4::{self, NestedScales, Nf4Blocks, Scales};
use pagoda_tensor::DType;
use serde_json::Value;

use crate::weights::WeightSource;
use crate::{Error, Result};

/// The suffix of the JSON quant-state tensor of an NF4 weight, and of an FP4 one (refused).
const NF4_STATE: &str = "quant_state.bitsandbytes__nf4";
const FP4_STATE: &str = "quant_state.bitsandbytes__fp4";

fn error(name: &str, message: impl Into<String>) -> Error {
    Error::Quantization {
        name: name.into(),
        message: message.into(),
    }
}

/// Whether the checkpoint stores the weight `name` in bitsandbytes' 4-bit form.
pub(crate) fn is_stored_4bit(source: &dyn WeightSource, name: &str) -> bool {
    source.contains(&format!("{name}.{NF4_STATE}"))
        || source.contains(&format!("{name}.{FP4_STATE}"))
}

/// The NF4 weight `name` of shape `[rows, cols]`, as bitsandbytes saved it.
pub(crate) fn load_nf4(
    source: &dyn WeightSource,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<Nf4Blocks> {
    if source.contains(&format!("{name}.{FP4_STATE}")) {
        return Err(error(name, "FP4 weights are not supported (only NF4)"));
    }
    let state_bytes = source.load_raw(&format!("{name}.{NF4_STATE}"))?;
    if state_bytes.dtype() != DType::U8 {
        return Err(error(
            name,
            format!("the quant state is {}, not uint8 JSON", state_bytes.dtype()),
        ));
    }
    let text = String::from_utf8(state_bytes.to_vec::<u8>()?)
        .map_err(|e| error(name, format!("the quant state is not UTF-8: {e}")))?;
    let state: Value = serde_json::from_str(&text)
        .map_err(|e| error(name, format!("the quant state is not JSON: {e}")))?;
    let field = |key: &str| {
        state
            .get(key)
            .ok_or_else(|| error(name, format!("the quant state has no `{key}`")))
    };
    let usize_field = |key: &str| {
        field(key)?
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| error(name, format!("`{key}` is not an integer")))
    };
    if field("quant_type")?.as_str() != Some("nf4") {
        return Err(error(
            name,
            format!("quant_type {} is not nf4", field("quant_type")?),
        ));
    }
    let shape: Vec<usize> = field("shape")?
        .as_array()
        .map(|dims| {
            dims.iter()
                .filter_map(Value::as_u64)
                .map(|d| d as usize)
                .collect()
        })
        .unwrap_or_default();
    if shape != [rows, cols] {
        return Err(Error::WeightShape {
            name: name.into(),
            expected: vec![rows, cols],
            got: shape,
        });
    }
    let block_size = usize_field("blocksize")?;
    let len = rows * cols;

    let packed = source.load_raw(name)?;
    if packed.dtype() != DType::U8 {
        return Err(error(
            name,
            format!(
                "packed weights of {} (bnb_4bit_quant_storage other than uint8) are not supported",
                packed.dtype()
            ),
        ));
    }
    let quant_map = source
        .load_raw(&format!("{name}.quant_map"))?
        .to_vec_f32()?;
    if quant_map.len() != 16
        || quant_map
            .iter()
            .zip(nf4::CODE)
            .any(|(a, b)| a.to_bits() != b.to_bits())
    {
        return Err(error(name, "quant_map is not the NF4 code"));
    }
    let absmax = source.load_raw(&format!("{name}.absmax"))?;
    let scales = if state.get("nested_offset").is_some() {
        if absmax.dtype() != DType::U8 {
            return Err(error(
                name,
                format!("nested absmax codes are {}, not uint8", absmax.dtype()),
            ));
        }
        let offset = field("nested_offset")?
            .as_f64()
            .ok_or_else(|| error(name, "`nested_offset` is not a number"))?
            as f32;
        let nested_block_size = usize_field("nested_blocksize")?;
        let nested_absmax = source
            .load_raw(&format!("{name}.nested_absmax"))?
            .to_vec_f32()?;
        Scales::Nested(NestedScales {
            quantized: absmax.to_vec::<u8>()?,
            code: source
                .load_raw(&format!("{name}.nested_quant_map"))?
                .to_vec_f32()?,
            offsets: vec![offset; nested_absmax.len()],
            absmax: nested_absmax,
            block_size: nested_block_size,
        })
    } else {
        Scales::Absmax(absmax.to_vec_f32()?)
    };
    Nf4Blocks::new(packed.to_vec::<u8>()?, len, block_size, scales)
        .map_err(|e| error(name, e.to_string()))
}

/// Checks `config.json`'s `quantization_config`, if any: bitsandbytes in 4 bits, NF4, is what
/// loads; other methods (8-bit, FP4, GPTQ, AWQ, ...) are refused by name.
pub(crate) fn check_quantization_config(config: &Value) -> std::result::Result<(), String> {
    let Some(q) = config.get("quantization_config") else {
        return Ok(());
    };
    let method = q
        .get("quant_method")
        .and_then(Value::as_str)
        .unwrap_or("unknown");
    if method != "bitsandbytes" {
        return Err(format!(
            "quantization method `{method}` is not supported (only bitsandbytes NF4)"
        ));
    }
    if q.get("load_in_8bit").and_then(Value::as_bool) == Some(true) {
        return Err("bitsandbytes 8-bit checkpoints are not supported (only NF4)".into());
    }
    match q.get("bnb_4bit_quant_type").and_then(Value::as_str) {
        Some("nf4") | None => Ok(()),
        Some(other) => Err(format!(
            "bnb_4bit_quant_type `{other}` is not supported (only nf4)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use pagoda_tensor::safetensors::SafeTensors;

    use super::*;

    #[test]
    fn quantization_configs_are_checked() {
        let config = |q: Value| serde_json::json!({ "quantization_config": q });
        assert!(check_quantization_config(&serde_json::json!({})).is_ok());
        let nf4 = serde_json::json!({
            "quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_type": "nf4"
        });
        assert!(check_quantization_config(&config(nf4)).is_ok());
        for (q, named) in [
            (serde_json::json!({"quant_method": "gptq"}), "gptq"),
            (
                serde_json::json!({"quant_method": "bitsandbytes", "load_in_8bit": true}),
                "8-bit",
            ),
            (
                serde_json::json!({"quant_method": "bitsandbytes", "bnb_4bit_quant_type": "fp4"}),
                "fp4",
            ),
        ] {
            let message = check_quantization_config(&config(q)).unwrap_err();
            assert!(message.contains(named), "{message}");
        }
    }

    /// `bnb.nn.Linear4bit` state dicts written by bitsandbytes itself
    /// (`benches/peers/nf4_matmul.py --dump $PAGODA_NF4_BNB_DIR`, on a machine that has it):
    /// read through the same path as a checkpoint, they decode to the very bits bitsandbytes'
    /// `dequantize_4bit` gives.
    #[test]
    fn reads_what_bitsandbytes_saves() {
        let Some(dir) = std::env::var_os("PAGODA_NF4_BNB_DIR") else {
            eprintln!("reads_what_bitsandbytes_saves: skipped: PAGODA_NF4_BNB_DIR is not set");
            return;
        };
        let path = std::path::Path::new(&dir).join("linear4bit.safetensors");
        let file = SafeTensors::open(&path).expect("linear4bit.safetensors");
        for prefix in ["nested", "plain"] {
            let name = format!("{prefix}.weight");
            assert!(is_stored_4bit(&file, &name), "{name}: no quant state");
            let blocks = load_nf4(&file, &name, 67, 192).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                matches!(blocks.scales(), Scales::Nested(_)),
                prefix == "nested"
            );
            // The decoded weight, in the dtype bitsandbytes decoded to (that of the weight it
            // quantized); ours rounded to the same dtype.
            let expected = file.get(&format!("{prefix}.expected_weight")).unwrap();
            let dtype = expected.dtype();
            let expected = expected.to_vec_f32().unwrap();
            let ours = blocks.dequantize();
            assert_eq!(ours.len(), expected.len());
            for (i, (&a, &b)) in ours.iter().zip(&expected).enumerate() {
                let a = match dtype {
                    DType::F16 => half::f16::from_f32(a).to_f32(),
                    DType::BF16 => half::bf16::from_f32(a).to_f32(),
                    _ => a,
                };
                assert_eq!(a.to_bits(), b.to_bits(), "{name} element {i}: {a} vs {b}");
            }
            println!("{name}: bitsandbytes' Linear4bit state loads and decodes bit for bit");
        }
    }
}
