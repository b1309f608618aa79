#!/usr/bin/env python3
"""Write the Hugging Face transformers reference fixtures for pagoda's parity tests.

Run from anywhere:  python3 scripts/make_fixtures.py [--smollm2-gguf PATH] [--skip-smollm2]

It writes, on the CPU in float32 and from fixed seeds (a rerun with the versions pinned in
scripts/requirements-fixtures.txt reproduces every file byte for byte on the same machine; another
CPU may round some logits differently in the last bit):

* crates/pagoda-models/tests/fixtures/<name>/ -- tiny random checkpoints (config.json,
  generation_config.json, safetensors) built from configs alone, plus reference.json: per prompt the
  logits of every position and the greedy continuation.
* crates/pagoda-engine/tests/fixtures/smollm2_reference.json -- prompts, prompt token ids, greedy
  continuations and first-step top-5 logits of SmolLM2-135M-Instruct loaded from its Q4_1 GGUF file
  (path from --smollm2-gguf, else $PAGODA_SMOLLM2_GGUF, else the default below).

The script checks its own references: the checkpoint read back from disk gives the logits of the
model in memory, eager attention agrees with SDPA, `generate` agrees with a plain argmax loop, no
greedy step is a near-tie, and the logits read back from the JSON are the same float32 bits.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# The GGUF loader reports progress through tqdm; keep the output to what this script prints.
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_FIXTURES = REPO_ROOT / "crates" / "pagoda-models" / "tests" / "fixtures"
SMOLLM2_REFERENCE = REPO_ROOT / "crates" / "pagoda-engine" / "tests" / "fixtures" / "smollm2_reference.json"
DEFAULT_SMOLLM2_GGUF = REPO_ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"  # scripts/fetch-smollm2.sh

PROMPT_LENGTHS = (1, 5, 17, 40)
TINY_NEW_TOKENS = 8
SMOLLM2_NEW_TOKENS = 24

# Spread of the random weights. Large next to the usual 0.02 so that two layers of width 64 already
# give logits with a clear winner; biases and norm gains are drawn too, so a loader that drops or
# swaps one of them changes the logits.
MATRIX_STD = 0.15
VECTOR_STD = 0.1

# SDPA and eager attention compute the same thing in a different order; in float32 they must agree
# to this fraction of the largest logit.
EAGER_TOLERANCE = 1e-5
# The checkpoint read back from disk must reproduce the model that wrote it to this fraction.
RELOAD_TOLERANCE = 1e-6
# Every greedy step must win by at least this much (in logits; they span about +-5), so that a
# correct implementation carrying float32 rounding differences cannot pick another token. The seeds
# below were chosen so that every model clears it.
MIN_GREEDY_MARGIN = 2e-2


# --------------------------------------------------------------------------------------------------
# Tiny random models
# --------------------------------------------------------------------------------------------------


@dataclass
class TinyModel:
    """One tiny checkpoint: how to build it, how to save it, what it is meant to cover."""

    name: str
    seed: int
    build: Callable[[], torch.nn.Module]
    covers: str
    # Largest shard save_pretrained may write; None keeps one file.
    max_shard_size: str | None = None
    # Rewrite config.json in the layout of the checkpoints on the Hub (transformers 4.x keys);
    # None keeps what transformers 5 writes.
    legacy_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None


def gpt_neox(parallel: bool, act: str) -> torch.nn.Module:
    """A Pythia-shaped GPT-NeoX: partial rotary (25% of each head), biases, untied embed_out."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,  # head size 16, of which 4 dims are rotated
        intermediate_size=128,
        hidden_act=act,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        max_position_embeddings=128,
        layer_norm_eps=1e-5,
        use_parallel_residual=parallel,
        attention_bias=True,
        tie_word_embeddings=False,
        initializer_range=MATRIX_STD,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return GPTNeoXForCausalLM(config)


def llama(**overrides: Any) -> torch.nn.Module:
    """A Llama with the given config fields over a small GQA base."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields: dict[str, Any] = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=MATRIX_STD,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    fields.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**fields))


# Llama 3.x frequency-dependent RoPE scaling. With head_dim 16 and theta 500000 the 8 wavelengths
# 2*pi*theta^(2i/16) are 6.3, 32.5, 168, ... ; original_max_position_embeddings 64 puts the bands at
# wavelength 64/4 = 16 and 64/1 = 64, so i = 0 is kept, i = 1 is interpolated, i >= 2 are divided
# by the factor. `rope_bands` in reference.json records this, and the script asserts all three occur.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
LLAMA3_THETA = 500000.0


def tiny_llama() -> torch.nn.Module:
    """Llama-3.2-shaped: GQA 4/2, llama3 RoPE scaling, untied lm_head."""
    return llama(
        vocab_size=320,
        tie_word_embeddings=False,
        rope_parameters={**LLAMA3_ROPE, "rope_theta": LLAMA3_THETA},
    )


def tiny_llama_tied() -> torch.nn.Module:
    """SmolLM2-shaped: 3 query heads sharing 1 KV head, plain RoPE, lm_head tied to the embedding."""
    return llama(
        vocab_size=300,
        hidden_size=48,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=96,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    )


def neox_hub_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json as Pythia's on the Hub spell it: rotary_pct / rotary_emb_base, torch_dtype."""
    out = {k: v for k, v in config.items() if k not in ("rope_parameters", "dtype")}
    rope = config["rope_parameters"]
    out["rotary_pct"] = rope["partial_rotary_factor"]
    out["rotary_emb_base"] = rope["rope_theta"]
    out["torch_dtype"] = config["dtype"]
    return dict(sorted(out.items()))


def llama_hub_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json as Llama 3.2's on the Hub spell it: rope_theta + rope_scaling, torch_dtype."""
    out = {k: v for k, v in config.items() if k not in ("rope_parameters", "dtype")}
    rope = dict(config["rope_parameters"])
    out["rope_theta"] = rope.pop("rope_theta")
    out["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    out["torch_dtype"] = config["dtype"]
    return dict(sorted(out.items()))


TINY_MODELS = [
    TinyModel(
        name="tiny-gpt-neox",
        seed=1001,
        build=lambda: gpt_neox(parallel=True, act="gelu"),
        covers="Pythia: parallel residual, exact (erf) gelu, rotary on 25% of each head, "
        "biases, untied embed_out; config.json in the Hub's transformers-4 layout",
        legacy_config=neox_hub_config,
    ),
    TinyModel(
        name="tiny-gpt-neox-sequential",
        seed=1006,
        build=lambda: gpt_neox(parallel=False, act="gelu_new"),
        covers="GPT-NeoX with sequential residual and tanh-approximated gelu (gelu_new); "
        "config.json as transformers 5 writes it",
    ),
    TinyModel(
        name="tiny-llama",
        seed=1007,
        build=tiny_llama,
        covers="Llama 3.2: GQA 4 query / 2 KV heads, llama3 RoPE scaling hitting all three bands, "
        "untied lm_head, sharded safetensors; config.json in the Hub's transformers-4 layout",
        max_shard_size="100KB",
        legacy_config=llama_hub_config,
    ),
    TinyModel(
        name="tiny-llama-tied",
        seed=1009,
        build=tiny_llama_tied,
        covers="SmolLM2: 3 query heads / 1 KV head, plain RoPE theta 1e5, lm_head tied to "
        "embed_tokens (no lm_head tensor saved); config.json as transformers 5 writes it",
    ),
]


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Draw every parameter from our own generator: matrices N(0, MATRIX_STD), biases
    N(0, VECTOR_STD), norm gains 1 + N(0, VECTOR_STD). Independent of transformers' init order."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if param.ndim >= 2:
                param.copy_(noise * MATRIX_STD)
            elif name.endswith(".bias"):
                param.copy_(noise * VECTOR_STD)
            else:
                param.copy_(1.0 + noise * VECTOR_STD)


def rope_bands(config: Any) -> list[str]:
    """Which llama3 band each rotary frequency falls in (same rule as transformers' rope init)."""
    rope = config.rope_parameters
    head_dim = config.head_dim
    inv_freq = 1.0 / (
        rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    )
    wavelen = 2 * math.pi / inv_freq
    old_ctx = rope["original_max_position_embeddings"]
    low_wavelen = old_ctx / rope["low_freq_factor"]
    high_wavelen = old_ctx / rope["high_freq_factor"]
    bands = []
    for w in wavelen.tolist():
        if w < high_wavelen:
            bands.append("high (kept)")
        elif w > low_wavelen:
            bands.append("low (divided by factor)")
        else:
            bands.append("medium (interpolated)")
    return bands


def logits_of(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """[len, vocab] float32 logits of every position of one unpadded prompt."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0].float()


def greedy(model: torch.nn.Module, ids: list[int], new_tokens: int) -> list[int]:
    """HF `generate` greedy continuation of one unpadded prompt."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=new_tokens,
        )
    return out[0, len(ids) :].tolist()


def argmax_loop(model: torch.nn.Module, ids: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy decoding by full recomputation, no KV cache: tokens and each step's top-1 - top-2 gap."""
    seq = list(ids)
    margins = []
    for _ in range(new_tokens):
        last = logits_of(model, seq)[-1]
        top = torch.topk(last, 2)
        margins.append(float(top.values[0] - top.values[1]))
        seq.append(int(top.indices[0]))
    return seq[len(ids) :], margins


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|: the parity measure the Rust tests use."""
    return float((a - b).abs().max() / b.abs().max())


def check_round_trip(path: Path, logits: list[np.ndarray]) -> None:
    """The logits read back from the JSON, as float32, must be the very same bits."""
    written = json.loads(path.read_text())["prompts"]
    for expected, prompt in zip(logits, written, strict=True):
        parsed = np.array(prompt["logits"], dtype=np.float32)
        assert np.array_equal(parsed, expected), f"{path}: logits do not round-trip through JSON"


def safetensors_names(model_dir: Path) -> list[str]:
    names = []
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            names.extend(f.keys())
    return sorted(names)


def make_tiny(spec: TinyModel) -> dict[str, int]:
    """Build, save, check and record one tiny model; returns the sizes of the files written."""
    from transformers import AutoModelForCausalLM

    out_dir = MODELS_FIXTURES / spec.name
    if out_dir.exists():
        shutil.rmtree(out_dir)

    torch.manual_seed(spec.seed)
    model = spec.build().eval()
    randomize(model, spec.seed)
    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if spec.max_shard_size is not None:
        save_kwargs["max_shard_size"] = spec.max_shard_size
    model.save_pretrained(out_dir, **save_kwargs)

    config_path = out_dir / "config.json"
    written_config = json.loads(config_path.read_text())
    if spec.legacy_config is not None:
        config_path.write_text(json.dumps(spec.legacy_config(written_config), indent=2) + "\n")

    # What the Rust side reads is the directory, so the references come from the directory.
    loaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    eager = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    attn = loaded.config._attn_implementation
    assert attn == "sdpa", f"{spec.name}: default attention is {attn!r}, expected sdpa"
    assert loaded.config.to_dict()["rope_parameters"] == model.config.to_dict()["rope_parameters"], (
        f"{spec.name}: rope parameters changed across save/load"
    )

    names = safetensors_names(out_dir)
    config = loaded.config
    tied = bool(config.tie_word_embeddings)
    if tied:
        assert not any(n.startswith("lm_head") for n in names), f"{spec.name}: tied lm_head was saved"
    if spec.max_shard_size is not None:
        index = out_dir / "model.safetensors.index.json"
        shards = sorted(out_dir.glob("model-*-of-*.safetensors"))
        assert index.exists() and len(shards) > 1, f"{spec.name}: expected a sharded checkpoint"

    rng = np.random.default_rng(spec.seed)
    prompts = []
    eager_worst = 0.0
    for length in PROMPT_LENGTHS:
        ids = rng.integers(0, config.vocab_size, size=length).tolist()
        logits = logits_of(loaded, ids)
        in_memory = logits_of(model, ids)
        # Not always bit-equal: the mmapped tensors sit at other alignments, and the CPU kernels' SIMD
        # paths then round differently in the last bit.
        reload_diff = max_rel_diff(in_memory, logits)
        assert reload_diff < RELOAD_TOLERANCE, f"{spec.name}: reloaded checkpoint differs {reload_diff:.3g}"
        eager_diff = max_rel_diff(logits_of(eager, ids), logits)
        assert eager_diff < EAGER_TOLERANCE, f"{spec.name} len {length}: eager vs sdpa {eager_diff:.3g}"
        eager_worst = max(eager_worst, eager_diff)

        tokens = greedy(loaded, ids, TINY_NEW_TOKENS)
        assert len(tokens) == TINY_NEW_TOKENS, f"{spec.name}: generate stopped after {len(tokens)}"
        loop_tokens, margins = argmax_loop(loaded, ids, TINY_NEW_TOKENS)
        assert tokens == loop_tokens, f"{spec.name}: generate {tokens} != argmax loop {loop_tokens}"
        assert min(margins) > MIN_GREEDY_MARGIN, f"{spec.name}: near-tie greedy step {min(margins):.3g}"

        prompts.append(
            {
                "input_ids": ids,
                "greedy": tokens,
                "greedy_min_margin": min(margins),
                "logits": logits.numpy(),
            }
        )

    reference: dict[str, Any] = {
        "model": spec.name,
        "covers": spec.covers,
        "architecture": config.architectures[0],
        "config_layout": "hub (transformers 4.x keys)" if spec.legacy_config else "transformers 5",
        "dtype": "float32",
        "attn_implementation": attn,
        "eager_vs_sdpa_max_rel_diff": eager_worst,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": tied,
        "tensors": names,
    }
    if config.rope_parameters.get("rope_type") == "llama3":
        bands = rope_bands(config)
        for band in ("high", "medium", "low"):
            assert any(b.startswith(band) for b in bands), f"{spec.name}: no {band}-frequency band"
        reference["rope_bands"] = bands
    reference["generator"] = generator_info()
    reference["greedy_new_tokens"] = TINY_NEW_TOKENS
    reference["prompts"] = prompts
    (out_dir / "reference.json").write_text(to_json(reference))
    check_round_trip(out_dir / "reference.json", [p["logits"] for p in prompts])

    return {str(p.relative_to(REPO_ROOT)): p.stat().st_size for p in sorted(out_dir.iterdir())}


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from its GGUF file
# --------------------------------------------------------------------------------------------------

SMOLLM2_RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
]
SMOLLM2_CHAT_MESSAGES = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
]


def smollm2_case(model: Any, tokenizer: Any, ids: list[int]) -> dict[str, Any]:
    """Greedy continuation (EOS may stop it), its decoded text, step margins, first-step top-5."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=SMOLLM2_NEW_TOKENS,
            output_logits=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[0, len(ids) :].tolist()
    step_margins = []
    for step_logits in out.logits:
        top = torch.topk(step_logits[0].float(), 2)
        step_margins.append(float(top.values[0] - top.values[1]))

    first = logits_of(model, ids)[-1]
    top5 = torch.topk(first, 5)
    assert int(top5.indices[0]) == new[0], "SmolLM2: first greedy token is not the forward argmax"
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    return {
        "input_ids": ids,
        "greedy": new,
        "stopped_on_eos": len(new) < SMOLLM2_NEW_TOKENS or new[-1] in eos_ids,
        "completion_text": tokenizer.decode(new, skip_special_tokens=True),
        "completion_text_with_special": tokenizer.decode(new, skip_special_tokens=False),
        "greedy_margins": step_margins,
        "first_step_top5": {
            "ids": top5.indices.tolist(),
            "logits": top5.values.numpy(),
        },
    }


def make_smollm2(gguf_path: Path) -> dict[str, int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.gguf import read_gguf_metadata
    from transformers.integrations.gguf.utils import is_gguf_arch_supported

    if not gguf_path.is_file():
        sys.exit(
            f"SmolLM2 GGUF not found at {gguf_path}; pass --smollm2-gguf, set PAGODA_SMOLLM2_GGUF, "
            "or use --skip-smollm2"
        )
    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    metadata, _ = read_gguf_metadata(str(gguf_path))
    arch = metadata["general.architecture"]

    # Which token the tokenizer puts in front of a prompt, if any, is what generation sees.
    probe = SMOLLM2_RAW_PROMPTS[0]
    with_special = tokenizer(probe, add_special_tokens=True).input_ids
    without_special = tokenizer(probe, add_special_tokens=False).input_ids
    adds_bos = with_special != without_special

    cases = []
    for text in SMOLLM2_RAW_PROMPTS:
        ids = tokenizer(text, add_special_tokens=True).input_ids
        cases.append(
            {
                "kind": "raw",
                "prompt": text,
                "add_special_tokens": True,
                **smollm2_case(model, tokenizer, ids),
            }
        )
    for message in SMOLLM2_CHAT_MESSAGES:
        messages = [{"role": "user", "content": message}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The rendered template already holds every special token, so nothing more is added.
        ids = tokenizer(rendered, add_special_tokens=False).input_ids
        templated = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=True
        )
        assert list(templated["input_ids"]) == ids, "SmolLM2: chat template tokenization disagrees"
        cases.append(
            {
                "kind": "chat",
                "messages": messages,
                "prompt": rendered,
                "add_special_tokens": False,
                **smollm2_case(model, tokenizer, ids),
            }
        )

    config = model.config
    reference = {
        "model": "SmolLM2-135M-Instruct",
        "gguf_file": name,
        "gguf_architecture": arch,
        "gguf_bytes": gguf_path.stat().st_size,
        "loader": "transformers legacy GGUF path (modeling_gguf_pytorch_utils.load_gguf_checkpoint: "
        "gguf-py dequantize to float32, Q/K rows un-permuted)"
        if not is_gguf_arch_supported(arch)
        else "transformers GGUF quantizer path",
        "dtype": "float32",
        "attn_implementation": config._attn_implementation,
        "tokenizer": {
            "adds_bos": adds_bos,
            "add_bos_token_flag": getattr(tokenizer, "add_bos_token", None),
            "bos_token_id": tokenizer.bos_token_id,
            "bos_token": tokenizer.bos_token,
            "eos_token_id": tokenizer.eos_token_id,
            "eos_token": tokenizer.eos_token,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "config": {
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "intermediate_size": config.intermediate_size,
            "rms_norm_eps": config.rms_norm_eps,
            "rope_parameters": config.rope_parameters,
            "tie_word_embeddings": config.tie_word_embeddings,
            "max_position_embeddings": config.max_position_embeddings,
        },
        "generation": {
            "do_sample": False,
            "max_new_tokens": SMOLLM2_NEW_TOKENS,
            "eos_token_id": model.generation_config.eos_token_id,
        },
        "generator": generator_info(),
        "cases": cases,
    }
    SMOLLM2_REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    SMOLLM2_REFERENCE.write_text(to_json(reference))
    return {str(SMOLLM2_REFERENCE.relative_to(REPO_ROOT)): SMOLLM2_REFERENCE.stat().st_size}


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def generator_info() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "gguf", "safetensors", "numpy", "tokenizers", "accelerate"):
        versions[package] = importlib.metadata.version(package)
    return {"script": "scripts/make_fixtures.py", **versions}


def f32(x: float) -> str:
    """Shortest decimal that reads back as the same float32."""
    value = np.float32(x)
    assert np.isfinite(value), "non-finite value in a reference"
    return str(value)


def to_json(obj: Any, indent: int = 0) -> str:
    """JSON with float32 arrays written in their shortest round-trip form, one row per line."""
    pad = "  " * indent
    inner = "  " * (indent + 1)
    if isinstance(obj, np.ndarray):
        if obj.ndim == 1:
            return "[" + ",".join(f32(v) for v in obj) + "]"
        return "[\n" + ",\n".join(inner + to_json(row, indent + 1) for row in obj) + "\n" + pad + "]"
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(k)}: {to_json(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(not isinstance(v, (dict, list, np.ndarray)) for v in obj):
            return json.dumps(obj)
        return "[\n" + ",\n".join(inner + to_json(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smollm2-gguf",
        type=Path,
        default=Path(os.environ.get("PAGODA_SMOLLM2_GGUF", DEFAULT_SMOLLM2_GGUF)),
        help="SmolLM2-135M-Instruct GGUF file (default: $PAGODA_SMOLLM2_GGUF or %(default)s)",
    )
    parser.add_argument("--skip-smollm2", action="store_true", help="write only the tiny models")
    args = parser.parse_args()

    # One thread: the same reduction order on every machine, and the shared cores stay free.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    sizes: dict[str, int] = {}
    for spec in TINY_MODELS:
        sizes.update(make_tiny(spec))
        print(f"wrote {spec.name}", file=sys.stderr)
    if not args.skip_smollm2:
        sizes.update(make_smollm2(args.smollm2_gguf))
        print("wrote smollm2_reference.json", file=sys.stderr)

    for path, size in sizes.items():
        print(f"{size:>9}  {path}")
    print(f"{sum(sizes.values()):>9}  total")


if __name__ == "__main__":
    main()
