"""Transforms: one raw record (a dict from JSONL/Parquet) -> a list of training samples.

A sample is ``{"input_ids": list[int], "labels": list[int]}`` of equal length, labels in the Hugging Face
convention (unshifted: ``labels[t] == input_ids[t]`` where token ``t`` is trained, -100 elsewhere; the model
shifts). Transforms return a *list* because one long document can become several samples; datasets flatten
it. A record that cannot become a sample raises ``BadRecordError`` with the reason; the dataset adds the file
and line and raises or skips per ``on_bad_record``.

Use them with ``functools.partial``, as in the seed::

    transform = partial(process_pretrain_example, tokenizer=tokenizer, max_seq_len=4096)
    transform = partial(process_sft_example, chat_template=build_chat_template("chatml", tokenizer), max_seq_len=4096)
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from veofast.data.chat_template import ChatTemplate, build_chat_template
from veofast.data.records import BadRecordError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
DATA_TYPES = ("plaintext", "conversation")
# Conversations cut to max_seq_len in this process, and the tokens they lost (logged by ``_note_truncation``).
_TRUNCATED = {"conversations": 0, "tokens": 0}


def _field(example: dict, keys: str | Sequence[str]) -> tuple[str, Any]:
    """The first of ``keys`` present in ``example`` with a value other than null, and that value."""
    names = [keys] if isinstance(keys, str) else list(keys)
    for name in names:
        if name in example and example[name] is not None:
            return name, example[name]
    null = [name for name in names if name in example]
    if null:
        raise BadRecordError(f"field {null[0]!r} is null")
    raise BadRecordError(f"record has none of the keys {names} (its keys: {sorted(example)})")


def _encode(tokenizer, text: str) -> list[int]:
    """``tokenizer.encode(text)`` with the tokenizer's special tokens; a fast tokenizer's Rust backend is called
    directly (same ids, without the per-call overhead of the Python wrapper)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        return backend.encode(text, add_special_tokens=True).ids
    return list(tokenizer.encode(text, add_special_tokens=True))


def process_pretrain_example(
    example: dict, tokenizer, max_seq_len: int, text_keys: str | Sequence[str] = "text"
) -> list[dict[str, list[int]]]:
    """Tokenize a document for pre-training: every token is trained.

    The text is the first of ``text_keys`` present in the record. It is tokenized with the tokenizer's own
    special tokens (e.g. BOS) and the EOS token is appended (unless already last). A document longer than
    ``max_seq_len`` is split, never dropped: pieces of ``max_seq_len`` tokens that overlap by one token, so
    each token but the document's first is predicted exactly once (a piece's first token is context only).

    Returns:
        samples, each ``{"input_ids", "labels"}`` of length <= ``max_seq_len`` (labels == input_ids).
    Raises:
        BadRecordError: the text is missing or not a string, or the document has a single token (nothing to
        predict).
    """
    if max_seq_len < 2:
        raise ValueError(f"process_pretrain_example: max_seq_len must be >= 2, got {max_seq_len}")
    if tokenizer.eos_token_id is None:
        raise ValueError("process_pretrain_example: the tokenizer has no eos_token; documents need one to end")
    key, text = _field(example, text_keys)
    if not isinstance(text, str):
        raise BadRecordError(f"field {key!r} must be a string, got {type(text).__name__}")
    ids = _encode(tokenizer, text)
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    if len(ids) < 2:
        raise BadRecordError(f"field {key!r} is empty: a one-token document has nothing to predict")
    stride = max_seq_len - 1
    pieces = [ids[start : start + max_seq_len] for start in range(0, len(ids) - 1, stride)]
    return [{"input_ids": piece, "labels": list(piece)} for piece in pieces]


def process_sft_example(
    example: dict, chat_template: ChatTemplate, max_seq_len: int, text_keys: str | Sequence[str] = "messages"
) -> list[dict[str, list[int]]]:
    """Encode a conversation for supervised fine-tuning: only the assistant's tokens are trained.

    ``example[text_keys]`` is a list of ``{"role": "system"|"user"|"assistant", "content": str}``. The chat
    template renders it, labels the assistant replies (and their end-of-turn token) and truncates to
    ``max_seq_len`` (a conversation is not split: later turns would lose their context); truncations are counted
    and logged with the tokens they lost (``_note_truncation``).

    Returns:
        one sample ``{"input_ids", "labels"}`` of length <= ``max_seq_len``.
    Raises:
        BadRecordError: messages missing or malformed, no assistant turn, or no assistant token left within
        ``max_seq_len``.
    """
    key, messages = _field(example, text_keys)
    if not isinstance(messages, list) or not messages:
        raise BadRecordError(f"field {key!r} must be a non-empty list of messages, got {messages!r:.80}")
    whole = chat_template.encode_messages(messages, max_seq_len=sys.maxsize)
    sample = {name: ids[:max_seq_len] for name, ids in whole.items()}
    if len(whole["input_ids"]) > max_seq_len:
        _note_truncation(len(whole["input_ids"]) - max_seq_len, max_seq_len)
    if all(label == IGNORE_INDEX for label in sample["labels"][1:]):
        raise BadRecordError(f"no assistant token within max_seq_len={max_seq_len}: nothing to train on")
    return [sample]


def _note_truncation(dropped_tokens: int, max_seq_len: int) -> None:
    """Count a conversation cut to ``max_seq_len``; log the running totals of this process at the 1st, 2nd, 4th,
    8th, ... cut, so that what truncation costs is visible without a line per sample."""
    _TRUNCATED["conversations"] += 1
    _TRUNCATED["tokens"] += dropped_tokens
    count = _TRUNCATED["conversations"]
    if count & (count - 1) == 0:
        logger.warning(
            "process_sft_example: %d conversation(s) longer than max_seq_len=%d were truncated so far in this "
            "process, losing %d tokens (raise data.max_seq_len to keep them)",
            count,
            max_seq_len,
            _TRUNCATED["tokens"],
        )


def build_data_transform(
    data_type: str,
    *,
    tokenizer,
    max_seq_len: int,
    text_keys: str | Sequence[str] | None = None,
    chat_template: str = "chatml",
) -> Callable[[dict], list[dict[str, list[int]]]]:
    """The transform for ``data.data_type``: ``"plaintext"`` (pre-training, text key default ``"text"``) or
    ``"conversation"`` (SFT with ``build_chat_template(chat_template, tokenizer)``, key default ``"messages"``)."""
    if data_type == "plaintext":
        return partial(
            process_pretrain_example, tokenizer=tokenizer, max_seq_len=max_seq_len, text_keys=text_keys or "text"
        )
    if data_type == "conversation":
        template = build_chat_template(chat_template, tokenizer)
        return partial(
            process_sft_example, chat_template=template, max_seq_len=max_seq_len, text_keys=text_keys or "messages"
        )
    raise ValueError(f"data_type must be one of {DATA_TYPES}, got {data_type!r}")
