#!/usr/bin/env python3
"""Write the Hugging Face transformers reference for pagoda's tokenizer and chat-template tests.

Run from anywhere:  python3 scripts/tokenizer_reference.py [--smollm2-gguf PATH]

Writes three fixtures under crates/pagoda-engine/tests/fixtures/:

* smollm2_tokenizer.json -- SmolLM2-135M-Instruct's tokenizer as transformers builds it from the
  GGUF file (`AutoTokenizer.from_pretrained(dir, gguf_file=name)`): the ids of a set of texts, the
  decoded text of those ids (with and without special tokens). The Rust test reads the vocabulary
  from the GGUF file itself ($PAGODA_SMOLLM2_GGUF).
* gguf_tokenizers.json -- small vocabularies written here into GGUF files of their own (byte-level
  BPE, "gpt2", and SentencePiece-style BPE with scores and no merges, "llama"), loaded back by
  transformers the same way. The fixture holds the vocabulary itself, so the Rust
  test needs no GGUF file; the vocabularies include the corner cases of transformers' converter
  (tokens respelled into the byte alphabet, control tokens skipped, user-defined tokens, merges
  derived from scores).
* chat_templates.json -- SmolLM2's chat template and a few written here to cover what Hugging Face
  templates use, rendered by `apply_chat_template(..., tokenize=False)` for a set of conversations
  (or the message of the exception the template raised).

Needs transformers (5.x), tokenizers and gguf; not torch.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import tempfile
from pathlib import Path

import gguf
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "crates" / "pagoda-engine" / "tests" / "fixtures"
DEFAULT_SMOLLM2_GGUF = REPO_ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

# Texts chosen to cross every branch of a byte-level pre-tokenizer: letters, digit runs, punctuation,
# runs of spaces and newlines, multi-byte UTF-8 (2, 3 and 4 bytes), and special tokens in the text.
TEXTS = [
    "Hello world",
    " Hello world",
    "Hello, world! How are you today?",
    "The year 2024 had 366 days; 12345 + 678 = 13023.",
    "3.14159265358979",
    "   leading and trailing spaces   ",
    "tabs\tand\ttabs\t\t",
    "line one\nline two\n\nline four\r\nwindows",
    "\n\n\n",
    " ",
    "",
    "a",
    "I'm sure you'll see they've done it, isn't it?",
    "CAPITALS and MiXeD cAsE",
    "naïve café résumé façade",
    "Grüße aus München, Straße",
    "日本語のテキストです。",
    "中文测试：你好，世界！",
    "한국어 텍스트",
    "Привет, мир!",
    "नमस्ते दुनिया",
    "cafe\u0301 decomposed",
    "مرحبا بالعالم",
    "emoji: 😀🎉👍🏽 and 🇯🇵 flags",
    "family: 👨‍👩‍👧‍👦",
    "def add(a, b):\n    return a + b\n",
    'fn main() {\n    println!("{}", 1 << 4);\n}',
    "<html><body class=\"x\">&amp;</body></html>",
    "https://example.com/path?query=1&other=two#frag",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<|im_start|> spaced <|im_end|>",
    "not special: <|im_start |> <im_end>",
    "mixed 123abc456 ___ --- ...",
]

CHATS = [
    ([{"role": "user", "content": "Hi there!"}], True),
    ([{"role": "user", "content": "Hi there!"}], False),
    (
        [
            {"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": "Where is the treasure?"},
        ],
        True,
    ),
    (
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And in words?\nPlease answer briefly."},
        ],
        True,
    ),
    ([{"role": "user", "content": "  spaces and ünïcödé 😀  \n"}], True),
    (
        [
            {"role": "system", "content": "  Think first.  "},
            {"role": "user", "content": "/help me"},
            {"role": "assistant", "content": "<think>\nreasoning here\n</think>\n\nThe answer."},
            {"role": "user", "content": "/retry"},
        ],
        False,
    ),
    # Two user turns in a row: templates that insist on alternation refuse this one.
    ([{"role": "user", "content": "one"}, {"role": "user", "content": "two"}], True),
]

# Templates written for this test, each exercising what Hugging Face chat templates rely on:
# trim_blocks/lstrip_blocks, `{%- -%}`, filters binding tighter than `+`, raise_exception,
# loop variables and loop controls, namespace(), and Python string and dict methods.
TEMPLATES = {
    "block_whitespace": """{% for message in messages %}
    {% if message.role == 'system' %}
System: {{ message.content }}
    {% else %}
{{ message.role | upper }}: {{ message.content }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
ASSISTANT:
{% endif %}
""",
    "header_ids": """{{- bos_token }}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
""",
    "alternating": """{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- continue %}
    {%- endif %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == (1 if messages[0]['role'] == 'system' else 0)) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + message['content'] + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
{%- endfor %}
""",
    "python_methods": """{%- set ns = namespace(last_user=-1, count=0) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {%- set ns.last_user = loop.index0 %}
        {%- set ns.count = ns.count + 1 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content %}
    {%- if message.role == 'assistant' and '</think>' in content %}
        {%- set content = content.split('</think>')[-1].lstrip('\n') %}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\n' + content.strip() + '<|im_end|>\n' }}
    {%- if content.startswith('/') %}
        {{- '(command ' + content[1:].split(' ')[0].title() + ')' }}
    {%- endif %}
    {%- if loop.index0 == ns.last_user %}
        {{- '<!-- last user message, ' + loop.index|string + ' of ' + loop.length|string + ' -->' }}
    {%- endif %}
    {%- if loop.index >= 3 %}
        {%- break %}
    {%- endif %}
{%- endfor %}
{%- if messages %}
    {{- '[' + messages[0].content.upper().rstrip() + '|' + messages[0].content.replace(' ', '_') + ']' }}
    {%- for key, value in messages[0].items() %}{{ key }}={{ value.endswith('!') }};{% endfor %}
    {{- messages[-1].get('role') ~ messages[-1].get('name', '?') }}
{%- endif %}
{{- ns.count }}
{%- if tools is none and documents is none and eos_token is defined and missing is not defined %}(no tools){% endif %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
""",
}


def versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in ("transformers", "tokenizers", "gguf")}


def load(directory: Path, name: str):
    return AutoTokenizer.from_pretrained(str(directory), gguf_file=name)


def encode_cases(tokenizer, texts: list[str]) -> list[dict]:
    cases = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        with_special = tokenizer.encode(text, add_special_tokens=True)
        cases.append(
            {
                "text": text,
                "ids": ids,
                "ids_with_special_tokens": with_special,
                "decoded": tokenizer.decode(with_special, skip_special_tokens=False),
                "decoded_skip_special_tokens": tokenizer.decode(with_special, skip_special_tokens=True),
            }
        )
    return cases


def smollm2(gguf_path: Path) -> dict:
    tokenizer = load(gguf_path.parent, gguf_path.name)
    encode = encode_cases(tokenizer, TEXTS)
    # Single tokens of a multi-byte character decode to U+FFFD; the incremental decoder must not
    # emit those, so record what a split character looks like.
    emoji_ids = tokenizer.encode("😀", add_special_tokens=False)
    partial = [
        {"ids": emoji_ids[:n], "decoded": tokenizer.decode(emoji_ids[:n])} for n in range(1, len(emoji_ids) + 1)
    ]
    return {
        "about": "SmolLM2-135M-Instruct's tokenizer as transformers builds it from the GGUF file; "
        "pre_tokenizer_variants: the same vocabulary under other `tokenizer.ggml.pre` values; "
        "written by scripts/tokenizer_reference.py",
        "versions": versions(),
        "gguf": gguf_path.name,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "chat_template": tokenizer.chat_template,
        "encode": encode,
        "partial_decode": partial,
        "pre_tokenizer_variants": pre_tokenizer_variants(gguf_path, encode),
    }


# `tokenizer.ggml.pre` values whose split regexes differ from GPT-2's, each a family in transformers.
PRE_VARIANTS = ("llama-bpe", "qwen2", "qwen35", "tekken", "gpt-4o")


def pre_tokenizer_variants(gguf_path: Path, default: list[dict]) -> dict:
    """SmolLM2's vocabulary with another pre-tokenizer: the ids of every text without special tokens."""
    vocab = gguf_vocab(gguf_path)
    variants = {}
    with tempfile.TemporaryDirectory() as work:
        for pre in PRE_VARIANTS:
            path = Path(work) / f"{pre}.gguf"
            write_gguf(path, vocab, pre)
            tokenizer = load(Path(work), path.name)
            ids = [tokenizer.encode(text, add_special_tokens=False) for text in TEXTS]
            # A variant that tokenizes every text like the default would test nothing.
            assert any(a != case["ids"] for a, case in zip(ids, default)), pre
            variants[pre] = ids
    return variants


def chat_templates(gguf_path: Path) -> dict:
    """SmolLM2's template and the test templates above, rendered by transformers for every chat."""
    tokenizer = load(gguf_path.parent, gguf_path.name)
    sources = {"smollm2": tokenizer.chat_template, **TEMPLATES}
    templates = []
    for name, source in sources.items():
        cases = []
        for messages, add_generation_prompt in CHATS:
            case = {"messages": messages, "add_generation_prompt": add_generation_prompt}
            try:
                case["rendered"] = tokenizer.apply_chat_template(
                    messages, chat_template=source, tokenize=False, add_generation_prompt=add_generation_prompt
                )
            except TemplateError as error:
                case["error"] = str(error)
            cases.append(case)
        templates.append({"name": name, "source": source, "cases": cases})
    return {
        "about": "chat templates rendered by transformers' apply_chat_template(..., tokenize=False) with "
        "SmolLM2's special tokens; written by scripts/tokenizer_reference.py",
        "versions": versions(),
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "templates": templates,
    }


# --------------------------------------------------------------------------------------------------
# Small GGUF vocabularies
# --------------------------------------------------------------------------------------------------

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


def gguf_vocab(path: Path) -> dict:
    """The tokenizer metadata of a GGUF file, under the names the fixtures use."""
    reader = gguf.GGUFReader(str(path))

    def scalar(key: str):
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        return None if field is None else field.contents()

    return {
        "model": scalar("model"),
        "tokens": scalar("tokens"),
        "token_types": scalar("token_type"),
        "merges": scalar("merges") or [],
        "scores": scalar("scores") or [],
        "bos_token_id": scalar("bos_token_id"),
        "eos_token_id": scalar("eos_token_id"),
        "unknown_token_id": scalar("unknown_token_id"),
        "padding_token_id": scalar("padding_token_id"),
        "add_bos_token": scalar("add_bos_token"),
        "add_eos_token": scalar("add_eos_token"),
    }


def byte_level_vocab(smollm2_path: Path) -> dict:
    """The first tokens and merges of SmolLM2's vocabulary, plus tokens that exercise the converter."""
    full = gguf_vocab(smollm2_path)
    keep = 700
    tokens = full["tokens"][:keep]
    token_types = full["token_types"][:keep]
    present = set(tokens)
    merges = [m for m in full["merges"] if all(p in present for p in m.split(" ")) and m.replace(" ", "") in present]
    extra = [
        # Not in the byte alphabet, so transformers respells it as the bytes of its UTF-8.
        ("€uro", NORMAL),
        # A control token outside the byte alphabet: transformers leaves it out of the special tokens.
        ("<|▁mislabelled|>", CONTROL),
        # Added whole, but not special.
        ("<think>", USER_DEFINED),
        ("</think>", USER_DEFINED),
        # A user-defined token outside the byte alphabet is not in the respelled vocabulary, so it is
        # not added.
        ("<tool ☎>", USER_DEFINED),
    ]
    for token, token_type in extra:
        tokens.append(token)
        token_types.append(token_type)
    return dict(full, tokens=tokens, token_types=token_types, merges=merges)


def sentencepiece_vocab() -> dict:
    """A small SentencePiece-style vocabulary: specials, the 256 byte tokens, scored pieces, no merges."""
    tokens = ["<unk>", "<s>", "</s>"]
    token_types = [UNKNOWN, CONTROL, CONTROL]
    scores = [0.0, 0.0, 0.0]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>")
        token_types.append(BYTE)
        scores.append(0.0)
    pieces = (
        "▁ e t a o n i h s r d l u ▁t ▁a he ▁th ▁the in er ▁w ▁s ▁o ou ▁h ▁he ll ▁i on re ▁b ▁c "
        "or ▁wor ld ▁world ▁hel llo ▁hello lo ▁f ▁to ▁an ▁and en at ed ▁is is it ▁it ing ▁in ▁of "
        "an ▁be ▁T ▁The ▁H ▁Hello , . ! ? 1 2 3 4 5 0 ▁1 12 123 你 好 ▁你 你好 世 界 世界 "
        "▁▁ ▁▁▁▁ ▁n ▁no ▁not ▁sp ▁spe ci al ▁special : ▁: c p g y w ▁y ▁yo ▁you"
    ).split(" ")
    for index, piece in enumerate(pieces):
        tokens.append(piece)
        token_types.append(NORMAL)
        # SentencePiece scores fall with rank; two equal scores test the tie order.
        scores.append(-float(index // 2 * 2))
    # Merges of equal score compete when they overlap: the longer left half wins, then the longer
    # right half, then the token that comes first. "pqrs" -> "p" "qrs" (not "pq" "rs"),
    # "vwxy" -> "vwx" "y" (not "vw" "xy"), "xabc" -> "x" "ab" "c" (not "x" "a" "bc").
    for piece, score in [
        ("q", -100.0), ("v", -100.0), ("x", -100.0), ("b", -100.0),
        ("rs", -1.0), ("vw", -1.0),
        ("pq", -50.0), ("xy", -50.0), ("qrs", -50.0), ("vwx", -50.0),
        ("ab", -60.0), ("bc", -60.0),
    ]:
        tokens.append(piece)
        token_types.append(NORMAL)
        scores.append(score)
    for token, token_type in [("<|eot|>", CONTROL), ("<tool>", USER_DEFINED), ("<0x41>", NORMAL)]:
        tokens.append(token)
        token_types.append(token_type)
        scores.append(0.0)
    return {
        "model": "llama",
        "tokens": tokens,
        "token_types": token_types,
        "merges": [],
        "scores": scores,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "unknown_token_id": 0,
        "padding_token_id": None,
        "add_bos_token": None,
        "add_eos_token": None,
    }


def write_gguf(path: Path, vocab: dict, pre: str | None) -> None:
    """A GGUF with llama hyperparameters (so transformers accepts it) and no tensors."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(vocab["tokens"]))
    writer.add_tokenizer_model(vocab["model"])
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["token_types"])
    if vocab["scores"]:
        writer.add_token_scores(vocab["scores"])
    if vocab["merges"]:
        writer.add_token_merges(vocab["merges"])
    for key, add in [
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unknown_token_id", writer.add_unk_token_id),
        ("padding_token_id", writer.add_pad_token_id),
        ("add_bos_token", writer.add_add_bos_token),
        ("add_eos_token", writer.add_add_eos_token),
    ]:
        if vocab[key] is not None:
            add(vocab[key])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def sentencepiece_vocab_from(smollm2_path: Path, count: int = 3000) -> dict:
    """SmolLM2's most frequent tokens respelled SentencePiece-style (`▁` for a space), scored by rank
    with ties in threes, and no merges: enough pieces that the order of the merges derived from
    the scores decides how words split."""
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    full = gguf_vocab(smollm2_path)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    token_types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    scores = [0.0] * len(tokens)
    seen = set(tokens)
    for token, token_type in zip(full["tokens"], full["token_types"]):
        if len(tokens) >= count or token_type != NORMAL:
            continue
        try:
            text = bytes(byte_of[c] for c in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        piece = text.replace(" ", "\u2581")
        if piece in seen or not piece.isprintable():
            continue
        seen.add(piece)
        tokens.append(piece)
        token_types.append(NORMAL)
        scores.append(-float((len(tokens) // 3) * 3))
    return {
        "model": "llama",
        "tokens": tokens,
        "token_types": token_types,
        "merges": [],
        "scores": scores,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "unknown_token_id": 0,
        "padding_token_id": None,
        "add_bos_token": False,
        "add_eos_token": None,
    }


SMALL_TEXTS = [
    "Hello world",
    "hello world, the world is not special!",
    "  two leading spaces",
    "The 12345 and 1 2 3",
    "你好世界 and 你",
    "emoji 😀 falls back to bytes",
    "ABC caps fall back",
    "€uro prices",
    "<s>inline bos</s> and <unk>",
    "<|eot|> end <|▁mislabelled|>",
    "<think>reasoning</think> done",
    "<tool ☎> <tool>",
    "line\nbreak\n\n and\ttab",
    "<|im_start|>user\nhi<|im_end|><|endoftext|>",
    "It's HE'S we'RE they'll",
    "a  \n\n  b   c\t\t d",
    "x!!!???...\n\nyes",
    "pqrs vwxy xabc",
    "",
]


def token_cases(tokenizer, count: int) -> list[dict]:
    """How single ids are spelled and decoded: the first ones, some in the middle, the last ones."""
    ids = sorted(set(range(12)) | set(range(count // 2, count // 2 + 4)) | set(range(count - 12, count)))
    return [
        {"id": i, "token": tokenizer.convert_ids_to_tokens(i), "decoded": tokenizer.decode([i])} for i in ids
    ]


def small_vocabularies(smollm2_path: Path) -> dict:
    cases = [
        ("byte_level", byte_level_vocab(smollm2_path), "smollm"),
        (
            "byte_level_bos_eos",
            dict(byte_level_vocab(smollm2_path), add_bos_token=True, add_eos_token=True),
            "llama-bpe",
        ),
        ("sentencepiece", sentencepiece_vocab(), None),
        ("sentencepiece_scored", sentencepiece_vocab_from(smollm2_path), None),
    ]
    out = []
    with tempfile.TemporaryDirectory() as work:
        for name, vocab, pre in cases:
            path = Path(work) / f"{name}.gguf"
            write_gguf(path, vocab, pre)
            tokenizer = load(Path(work), path.name)
            out.append(
                {
                    "name": name,
                    "vocab": dict(vocab, pre=pre),
                    "vocab_size": len(tokenizer),
                    "encode": encode_cases(tokenizer, SMALL_TEXTS + TEXTS),
                    "tokens": token_cases(tokenizer, len(vocab["tokens"])),
                }
            )
    return {
        "about": "small GGUF vocabularies and what transformers makes of them; written by scripts/tokenizer_reference.py",
        "versions": versions(),
        "vocabularies": out,
    }


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(REPO_ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smollm2-gguf",
        type=Path,
        default=Path(os.environ.get("PAGODA_SMOLLM2_GGUF", DEFAULT_SMOLLM2_GGUF)),
        help="SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch-smollm2.sh fetches it)",
    )
    args = parser.parse_args()
    write(FIXTURES / "smollm2_tokenizer.json", smollm2(args.smollm2_gguf))
    write(FIXTURES / "gguf_tokenizers.json", small_vocabularies(args.smollm2_gguf))
    write(FIXTURES / "chat_templates.json", chat_templates(args.smollm2_gguf))


if __name__ == "__main__":
    main()
