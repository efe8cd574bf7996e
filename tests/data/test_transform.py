"""Transforms: pre-training split with one-token overlap, EOS, SFT, bad records."""

from __future__ import annotations

import pytest

from veofast.data.chat_template import build_chat_template
from veofast.data.data_transform import build_data_transform, process_pretrain_example, process_sft_example
from veofast.data.records import BadRecordError


def test_pretrain_short(tokenizer):
    (sample,) = process_pretrain_example({"text": "abc"}, tokenizer, max_seq_len=16)
    assert sample["input_ids"] == tokenizer.encode("abc") + [tokenizer.eos_token_id]
    assert sample["labels"] == sample["input_ids"]


@pytest.mark.parametrize("length", [9, 10, 11, 25])
def test_pretrain_split_covers_every_target_once(tokenizer, length):
    text = "x" * (length - 1)  # + EOS = length tokens
    pieces = process_pretrain_example({"body": text}, tokenizer, max_seq_len=10, text_keys=["title", "body"])
    ids = tokenizer.encode(text) + [tokenizer.eos_token_id]
    assert all(2 <= len(p["input_ids"]) <= 10 for p in pieces)
    # piece k starts where piece k-1 ended minus one token; targets (all but each piece's first) partition ids[1:]
    start, targets = 0, []
    for piece in pieces:
        assert piece["input_ids"] == ids[start : start + len(piece["input_ids"])]
        targets += piece["input_ids"][1:]
        start += len(piece["input_ids"]) - 1
    assert targets == ids[1:]


def test_pretrain_bad_records(tokenizer):
    with pytest.raises(BadRecordError, match="none of the keys"):
        process_pretrain_example({"txt": "a"}, tokenizer, max_seq_len=8)
    with pytest.raises(BadRecordError, match="must be a string"):
        process_pretrain_example({"text": 3}, tokenizer, max_seq_len=8)
    with pytest.raises(BadRecordError, match="empty"):
        process_pretrain_example({"text": ""}, tokenizer, max_seq_len=8)
    with pytest.raises(BadRecordError, match="field 'text' is null"):
        process_pretrain_example({"text": None}, tokenizer, max_seq_len=8)
    (sample,) = process_pretrain_example(
        {"title": None, "body": "a"}, tokenizer, max_seq_len=8, text_keys=["title", "body"]
    )
    assert sample["input_ids"][0] == tokenizer.encode("a")[0]  # a null key gives way to the next one


def test_sft(tokenizer):
    template = build_chat_template("chatml", tokenizer)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (sample,) = process_sft_example({"messages": messages}, template, max_seq_len=64)
    assert sample == template.encode_messages(messages, max_seq_len=64)
    with pytest.raises(BadRecordError, match="no assistant token within max_seq_len=5"):
        process_sft_example({"messages": messages}, template, max_seq_len=5)
    with pytest.raises(BadRecordError, match="non-empty list"):
        process_sft_example({"messages": []}, template, max_seq_len=64)


def test_sft_truncation_is_logged(tokenizer, caplog, monkeypatch):
    import veofast.data.data_transform as data_transform

    monkeypatch.setattr(data_transform, "_TRUNCATED", {"conversations": 0, "tokens": 0})
    template = build_chat_template("chatml", tokenizer)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello " * 20}]
    whole = template.encode_messages(messages, max_seq_len=10**6)
    limit = len(whole["input_ids"]) - 7
    with caplog.at_level("WARNING", logger="veofast.data.data_transform"):
        for _ in range(3):
            (sample,) = process_sft_example({"messages": messages}, template, max_seq_len=limit)
            assert sample == {name: ids[:limit] for name, ids in whole.items()}
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2  # the 1st and the 2nd cut; the 4th would be next
    assert "2 conversation(s) longer than max_seq_len" in logged[1] and "losing 14 tokens" in logged[1]
    process_sft_example({"messages": messages}, template, max_seq_len=len(whole["input_ids"]))  # fits: no count
    assert data_transform._TRUNCATED == {"conversations": 3, "tokens": 21}


def test_build_data_transform(tokenizer):
    pretrain = build_data_transform("plaintext", tokenizer=tokenizer, max_seq_len=8)
    assert pretrain({"text": "ab"})[0]["labels"] == tokenizer.encode("ab") + [tokenizer.eos_token_id]
    sft = build_data_transform("conversation", tokenizer=tokenizer, max_seq_len=64)
    assert sft({"messages": [{"role": "assistant", "content": "ok"}]})
    with pytest.raises(ValueError, match="data_type"):
        build_data_transform("images", tokenizer=tokenizer, max_seq_len=8)
