"""Train the embedded tiny tokenizer (``tokenizers/tiny``) on the embedded corpus.

A byte-level BPE (GPT-2 style pre-tokenizer and decoder, so every string round-trips) trained with
the ``tokenizers`` library, with three special tokens: ``<|endoftext|>`` (end of text and padding),
``<|im_start|>`` and ``<|im_end|>`` (ChatML). The directory holds:

- ``tokenizer.json``: the ``tokenizers`` model;
- ``tokenizer_config.json``: a minimal, standard transformers config (eos/pad token, ChatML
  ``chat_template``), so ``transformers.AutoTokenizer.from_pretrained(dir)`` returns a
  ``PreTrainedTokenizerFast`` with ``apply_chat_template`` working;
- ``special_tokens_map.json``: the same special tokens, for older readers.

The input files are JSON lines with ``{"text": ...}`` or ``{"messages": [{"content": ...}, ...]}``.
Training is deterministic for a given corpus.

Usage::

    python tools/make_tokenizer.py --corpus data/tiny/train.jsonl data/tiny/sft.jsonl --out tokenizers/tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]  # ids 0, 1, 2

# ChatML: <|im_start|>{role}\n{content}<|im_end|>\n per message, then the assistant header if asked.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def iter_texts(paths: list[str | os.PathLike]) -> Iterator[str]:
    """Every text of the corpus files: a record's ``text``, or each message of its ``messages``."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if "text" in record:
                    yield record["text"]
                elif "messages" in record:
                    for message in record["messages"]:
                        yield message["role"]
                        yield message["content"]
                else:
                    raise ValueError(f"{path}:{lineno}: record has neither 'text' nor 'messages'")


def train_tokenizer(paths: list[str | os.PathLike], *, vocab_size: int = 1024):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on the texts of ``paths``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + specials), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter_texts(paths), trainer=trainer)
    return tokenizer


def tokenizer_config(*, model_max_length: int = 4096) -> dict:
    """The ``tokenizer_config.json`` contents: standard keys only."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save(tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "tokenizer.json", tokenizer.to_str(pretty=True) + "\n")
    _write_atomic(out / "tokenizer_config.json", json.dumps(tokenizer_config(), indent=2) + "\n")
    special = {"eos_token": EOS, "pad_token": EOS, "additional_special_tokens": [IM_START, IM_END]}
    _write_atomic(out / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--corpus",
        nargs="+",
        default=["data/tiny/train.jsonl", "data/tiny/sft.jsonl"],
        help="JSON-lines files to train on (default: data/tiny/train.jsonl data/tiny/sft.jsonl)",
    )
    parser.add_argument("--out", default="tokenizers/tiny", help="output directory (default: tokenizers/tiny)")
    parser.add_argument(
        "--vocab-size", type=int, default=1024, help="vocabulary size, specials included (default: 1024)"
    )
    args = parser.parse_args(argv)
    for path in args.corpus:
        if not Path(path).is_file():
            parser.error(f"--corpus: no such file {path!r}; generate it with tools/make_corpus.py")
    tokenizer = train_tokenizer(args.corpus, vocab_size=args.vocab_size)
    out = save(tokenizer, args.out)
    print(f"{out}: vocab {tokenizer.get_vocab_size()}, specials {[tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
