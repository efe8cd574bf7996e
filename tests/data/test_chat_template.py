"""Chat templates: the label mask on multi-turn conversations with system prompts."""

from __future__ import annotations

import pytest
from conftest import make_tokenizer

from veofast.data.chat_template import build_chat_template
from veofast.data.records import BadRecordError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6, surely."},
]
TRAINED = {"chatml": "4<|im_end|>6, surely.<|im_end|>", "llama3": "4<|eot_id|>6, surely.<|eot_id|>"}


def trained_text(tokenizer, out) -> str:
    return tokenizer.decode([t for t, label in zip(out["input_ids"], out["labels"], strict=True) if label != -100])


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_builtin_templates_mask_and_jinja(tokenizer, name):
    template = build_chat_template(name, tokenizer)
    out = template.encode_messages(CONVERSATION, max_seq_len=4096)
    assert len(out["input_ids"]) == len(out["labels"])
    assert trained_text(tokenizer, out) == TRAINED[name]
    # labels are unshifted: equal to input_ids wherever trained
    assert all(label in (-100, t) for t, label in zip(out["input_ids"], out["labels"], strict=True))
    # the Jinja template renders the same text
    rendered = make_tokenizer(template.get_jinja_template()).apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered == tokenizer.decode(out["input_ids"])


def test_chatml_exact_layout(tokenizer):
    out = build_chat_template("chatml", tokenizer).encode_messages(CONVERSATION[1:3])
    text = tokenizer.decode(out["input_ids"])
    assert text == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert out["labels"][-3:] == [tokenizer.encode("4")[0], im_end, -100]


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_tokenizer_template_matches_builtin(tokenizer, name):
    builtin = build_chat_template(name, tokenizer)
    own = build_chat_template("tokenizer", make_tokenizer(builtin.get_jinja_template()))
    for conversation in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:3]):
        assert own.encode_messages(conversation) == builtin.encode_messages(conversation)


def test_truncation(tokenizer):
    template = build_chat_template("chatml", tokenizer)
    full = template.encode_messages(CONVERSATION)
    cut = template.encode_messages(CONVERSATION, max_seq_len=20)
    assert cut == {"input_ids": full["input_ids"][:20], "labels": full["labels"][:20]}


def test_errors(tokenizer):
    template = build_chat_template("chatml", tokenizer)
    with pytest.raises(BadRecordError, match="no assistant"):
        template.encode_messages([{"role": "user", "content": "hi"}])
    with pytest.raises(BadRecordError, match=r"messages\[1\]\['role'\]"):
        template.encode_messages([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}])
    with pytest.raises(BadRecordError, match=r"messages\[0\]\['content'\]"):
        template.encode_messages([{"role": "assistant", "content": None}])
    with pytest.raises(BadRecordError, match=r"messages\[0\]\['role'\] must be one of .* got 'tool'"):
        template.encode_messages([{"role": "tool", "content": "42"}, {"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="unknown chat_template"):
        build_chat_template("alpaca", tokenizer)


@pytest.mark.parametrize("name", ["chatml", "llama3"])
@pytest.mark.parametrize("extra", [{"tool_calls": [{"name": "f"}]}, {"reasoning_content": "hm"}, {"loss": False}])
def test_keys_the_template_would_drop_are_bad_records(tokenizer, name, extra):
    """These templates render role and content only: a tool call, reasoning or per-turn flag would be lost silently;
    keys that hold nothing (Parquet's None for an absent struct field, an empty list) are fine."""
    template = build_chat_template(name, tokenizer)
    key = next(iter(extra))
    with pytest.raises(BadRecordError, match=rf"messages\[1\] has \['{key}'\], which chat template"):
        template.encode_messages([CONVERSATION[1], {**CONVERSATION[2], **extra}])
    empty = {**CONVERSATION[2], key: None, "tool_calls": [], "name": ""}
    assert template.encode_messages([CONVERSATION[1], empty]) == template.encode_messages(CONVERSATION[1:3])
    with pytest.raises(ValueError, match="no chat_template"):
        build_chat_template("tokenizer", tokenizer)


def test_tokenizer_template_refusals_are_bad_records():
    # what the template refuses depends on the record, so on_bad_record must apply: BadRecordError, not a crash
    alternating = (
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    template = build_chat_template("tokenizer", make_tokenizer(alternating))
    assert trained_text(template.tokenizer, template.encode_messages(CONVERSATION[1:3])) == "4<|im_end|>"
    with pytest.raises(BadRecordError, match="roles must alternate"):
        template.encode_messages([CONVERSATION[1], CONVERSATION[3], CONVERSATION[4]])
    with pytest.raises(BadRecordError, match="starts with the assistant"):
        template.encode_messages(CONVERSATION[2:])


def test_missing_special_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    with pytest.raises(ValueError, match="no special token '<\\|im_start\\|>'"):
        build_chat_template("chatml", plain)
