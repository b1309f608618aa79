#!/usr/bin/env python3
"""Write random-weight checkpoints of real model shapes and their float32 transformers logits.

    python3 scripts/gpu_parity_reference.py --out DIR [--models pythia-2.8b,llama-3.2-3b] [--tiny]
                                            [--device cuda|cpu]

For each model it writes DIR/<name>/ (DIR/<name>-tiny/ with --tiny):

* a Hugging Face checkpoint (config.json + float16 safetensors, possibly sharded) of the model's
  real config (as in shared/peers/hf_decode.py) with random weights, drawn on the device from a
  fixed seed;
* reference.safetensors, read by crates/pagoda-models/tests/gpu_parity.rs:
  - `prompt.<i>`        int32 [len]          random token ids of prompt i (lengths 7, 33, 128, 200);
  - `logits.<i>`        float32 [rows, vocab] logits of the last `rows` positions of prompt i, from
                                              the same float16 weights upcast to float32;
  - `logits_start.<i>`  int32 [1]            first position those rows belong to (len - rows);
  - `hf_rel_error.f16`, `hf_rel_error.bf16`  float32 [prompts]: relative L2 error of transformers'
                                              own float16 / bfloat16 run of the same weights
                                              against the float32 logits, the baseline that
                                              pagoda's errors are read against.
  The `__metadata__` entry says whether the logits of every position were kept (`logits=full`) or,
  when they would exceed --max-logits-mb, only of the last 16 (`logits=last16`).

Each prompt runs alone (no padding) with eager attention. --tiny shrinks every config (2 layers,
small widths, vocabulary 1024) so that the whole pipeline runs on a CPU in seconds.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig  # noqa: E402

MODELS = ("pythia-2.8b", "llama-3.2-3b")
PROMPT_LENGTHS = (7, 33, 128, 200)
# Positions kept per prompt when the logits of every position would be too large to keep.
TAIL_ROWS = 16
# Token ids are drawn away from both ends of the vocabulary, as in hf_decode.py.
ID_MARGIN = 10
# HF initialises norm gains to 1 and biases to 0; a small random offset makes a kernel that
# drops or misapplies one of them change the logits.
VECTOR_JITTER = 0.05


def make_config(name: str, tiny: bool):
    """The configs of shared/peers/hf_decode.py `make_config`, shrunk alike with `tiny`."""
    if name == "pythia-2.8b":  # EleutherAI/pythia-2.8b: 2.775B params
        kw = dict(vocab_size=50304, hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                  intermediate_size=10240, hidden_act="gelu", max_position_embeddings=2048, layer_norm_eps=1e-5,
                  use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
        small = dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024)
        cls = GPTNeoXConfig
    elif name == "llama-3.2-3b":  # meta-llama/Llama-3.2-3B: 3.213B params (tied embeddings)
        kw = dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                  num_attention_heads=24, num_key_value_heads=8, head_dim=128, hidden_act="silu",
                  max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                  bos_token_id=128000, eos_token_id=128001,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192})
        small = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=64)
        cls = LlamaConfig
    else:
        raise SystemExit(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    if tiny:
        kw.update(small, vocab_size=1024, num_hidden_layers=2, bos_token_id=None, eos_token_id=None)
    return cls(**kw)


def rel_l2(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """float32 [len, vocab] logits of one unpadded prompt."""
    return model(input_ids=ids[None], use_cache=False).logits[0].float()


@torch.no_grad()
def build(name: str, tiny: bool, device: torch.device, seed: int):
    torch.manual_seed(seed)
    with torch.device(device):  # allocate and initialise directly on the device
        model = AutoModelForCausalLM.from_config(make_config(name, tiny), dtype=torch.float16,
                                                 attn_implementation="eager")
    for param in model.parameters():
        if param.ndim == 1:
            param.add_(torch.randn_like(param), alpha=VECTOR_JITTER)
    # Random weights have no meaningful end of text; keep generate() settings from tripping on it.
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = None
    return model.eval()


def write_tokenizer(folder: Path, vocab: int) -> None:
    """A small byte-level BPE tokenizer.json, so that the engine and `pagoda generate` can run the
    random-weight checkpoint from text (the text it writes is noise; the point is the path).

    Every id of the model's vocabulary decodes to text: the trained merges cover a few hundred
    ids and the rest are filled with plain tokens (" w1234"), so that a stream of random tokens
    is a stream of text, as with a real tokenizer, and streaming clients time real chunks."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab, 600),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    text = "The quick brown fox jumps over the lazy dog. Pagodas have many roofs, one above another. " * 20
    tokenizer.train_from_iterator([text], trainer)
    spec = json.loads(tokenizer.to_str())
    words = spec["model"]["vocab"]
    taken = set(words.values()) | {t["id"] for t in spec["added_tokens"]}
    for i in range(vocab):
        if i not in taken:
            words[f"\u0120w{i}"] = i  # \u0120 is the byte-level alphabet's space
    (folder / "tokenizer.json").write_text(json.dumps(spec))


def write_model(name: str, args, out: Path) -> dict:
    device = torch.device(args.device)
    folder = out / (f"{name}-tiny" if args.tiny else name)
    if folder.exists():
        shutil.rmtree(folder)
    t0 = time.perf_counter()
    model = build(name, args.tiny, device, args.seed)
    vocab = model.config.vocab_size
    t_init = time.perf_counter() - t0

    model.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder, vocab)
    t_save = time.perf_counter() - t0 - t_init

    gen = torch.Generator().manual_seed(args.seed + 1)
    prompts = [torch.randint(ID_MARGIN, vocab - ID_MARGIN, (n,), generator=gen) for n in args.lengths]
    on_device = [p.to(device) for p in prompts]

    # Same weights in three precisions; float16 -> float32 is exact, so the float32 run sees exactly
    # the saved weights, and bfloat16 is rounded from float16 as pagoda rounds it on load.
    f16 = [logits_of(model, ids) for ids in on_device]
    model.float()
    f32 = [logits_of(model, ids) for ids in on_device]
    model.to(torch.bfloat16)
    bf16 = [logits_of(model, ids) for ids in on_device]
    del model

    for i, logits in enumerate(f32):
        if not torch.isfinite(logits).all():
            raise SystemExit(f"{name}: prompt {i} has non-finite float32 logits")
        if logits.std().item() < 1e-2:
            raise SystemExit(f"{name}: prompt {i} logits are degenerate (std {logits.std().item():.2e})")

    full_bytes = sum(n * vocab * 4 for n in args.lengths)
    keep_full = full_bytes <= args.max_logits_mb * 2**20
    tensors = {}
    for i, (ids, logits) in enumerate(zip(prompts, f32)):
        rows = len(ids) if keep_full else min(TAIL_ROWS, len(ids))
        start = len(ids) - rows
        tensors[f"prompt.{i}"] = ids.to(torch.int32).contiguous()
        tensors[f"logits.{i}"] = logits[start:].cpu().contiguous()
        tensors[f"logits_start.{i}"] = torch.tensor([start], dtype=torch.int32)
    hf_f16 = [rel_l2(a, b) for a, b in zip(f16, f32)]
    hf_bf16 = [rel_l2(a, b) for a, b in zip(bf16, f32)]
    tensors["hf_rel_error.f16"] = torch.tensor(hf_f16, dtype=torch.float32)
    tensors["hf_rel_error.bf16"] = torch.tensor(hf_bf16, dtype=torch.float32)
    metadata = {
        "model": name,
        "tiny": str(args.tiny).lower(),
        "logits": "full" if keep_full else f"last{TAIL_ROWS}",
        "seed": str(args.seed),
        "attention": "eager",
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    save_file(tensors, str(folder / "reference.safetensors"), metadata=metadata)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    last = f32[-1][-1]
    top2 = last.topk(2).values
    summary = dict(model=name, folder=str(folder), vocab=vocab, logits=metadata["logits"],
                   init_s=round(t_init, 1), save_s=round(t_save, 1),
                   total_s=round(time.perf_counter() - t0, 1),
                   logit_std=round(f32[-1].std().item(), 3), last_top2_margin=round((top2[0] - top2[1]).item(), 4),
                   hf_f16_rel_error=[f"{e:.2e}" for e in hf_f16], hf_bf16_rel_error=[f"{e:.2e}" for e in hf_bf16])
    print(json.dumps(summary), flush=True)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder that receives one subfolder per model")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--tiny", action="store_true", help="2 layers, small widths, vocabulary 1024 (CPU dry run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lengths", default=",".join(map(str, PROMPT_LENGTHS)), help="prompt lengths in tokens")
    p.add_argument("--max-logits-mb", type=float, default=200.0,
                   help=f"keep only the last {TAIL_ROWS} positions' logits when all of them would exceed this")
    args = p.parse_args()
    args.lengths = [int(n) for n in args.lengths.split(",") if n]
    if not args.lengths or min(args.lengths) < 1:
        raise SystemExit("--lengths needs positive prompt lengths")

    # The reference must be true float32: no TF32 in matmuls (PyTorch's default, made explicit).
    torch.set_float32_matmul_precision("highest")

    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for name in [m for m in args.models.split(",") if m]:
        write_model(name, args, args.out)
    print(json.dumps(dict(done=True, seconds=round(time.perf_counter() - t0, 1))), flush=True)


if __name__ == "__main__":
    main()
