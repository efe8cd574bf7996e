"""How veofast's ``CausalLM`` is called, against transformers with the same weights (fp32, CPU): padded batches
(left and right), position ids broadcast over rows, the MoE load-balancing loss under padding, KV-cache arguments
refused, and gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import hf_and_veofast

LOGIT_ATOL = 1e-4
LOSS_TOL = dict(atol=1e-5, rtol=1e-5)


def _batch(vocab: int, batch: int = 3, seq: int = 12, seed: int = 2) -> torch.Tensor:
    """``input_ids (batch, seq)``, random."""
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _padded(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(attention_mask, labels)``, both ``(3, T)``: row 0 unpadded, row 1 left-padded by 4, row 2 right-padded by 5.

    Labels are -100 on padding and on the first token of each row (whose label would be predicted from a pad).
    """
    mask = torch.ones_like(input_ids)
    mask[1, :4] = 0
    mask[2, -5:] = 0
    labels = input_ids.masked_fill(mask == 0, -100)
    first = mask.argmax(dim=1)
    labels[torch.arange(3), first] = -100
    return mask, labels


@pytest.mark.parametrize("case", ["llama", "qwen3_moe_aux"])
def test_left_and_right_padding_match_transformers(case, tmp_path):
    hf, model = hf_and_veofast(case, tmp_path)
    input_ids = _batch(hf.config.vocab_size)
    mask, labels = _padded(input_ids)
    with torch.no_grad():
        hf_logits = hf(input_ids, attention_mask=mask).logits
        logits = model(input_ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], hf_logits[real], atol=LOGIT_ATOL, rtol=0)

    hf_out = hf(input_ids, attention_mask=mask, labels=labels)
    out = model(input_ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, hf_out.loss, **LOSS_TOL)
    if hf.config.model_type.endswith("_moe"):  # transformers leaves padding out of the load-balancing loss
        torch.testing.assert_close(out.aux_loss, hf_out.aux_loss, **LOSS_TOL)
    hf_out.loss.backward()
    out.loss.backward()
    hf_grads = dict(hf.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, hf_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_inner_padding_is_refused(tmp_path):
    _, model = hf_and_veofast("llama", tmp_path)
    input_ids = _batch(model.config.vocab_size, batch=2, seq=6)
    mask = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="padding between tokens"):
        model(input_ids, attention_mask=mask)


def test_position_ids_of_one_row_apply_to_every_row(tmp_path):
    hf, model = hf_and_veofast("qwen3", tmp_path)
    input_ids = _batch(hf.config.vocab_size)
    position_ids = (torch.arange(input_ids.shape[1]) + 3).unsqueeze(0)  # (1, T), offset so defaults would differ
    with torch.no_grad():
        expected = hf(input_ids, position_ids=position_ids).logits
        logits = model(input_ids, position_ids=position_ids).logits
    torch.testing.assert_close(logits, expected, atol=LOGIT_ATOL, rtol=0)
    with pytest.raises(ValueError, match="position_ids must be"):
        model(input_ids, position_ids=position_ids[:, :-1])


def test_kv_cache_is_refused_and_use_cache_false_accepted(tmp_path):
    _, model = hf_and_veofast("llama", tmp_path)
    input_ids = _batch(model.config.vocab_size)
    with pytest.raises(ValueError, match="no KV cache"):
        model(input_ids, use_cache=True)
    with pytest.raises(ValueError, match="no KV cache"):
        model(input_ids, past_key_values=object())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids, use_cache=False).logits, model(input_ids).logits, atol=0, rtol=0)
    # the logits are the projection's own tensor, not a view (FSDP2 drops its pre-backward hook on a root's views)
    assert model(input_ids).logits._base is None


def test_gradient_checkpointing_and_eval_give_the_same_gradients(tmp_path):
    _, model = hf_and_veofast("qwen2_moe", tmp_path)
    input_ids = _batch(model.config.vocab_size)
    mask, labels = _padded(input_ids)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(input_ids, attention_mask=mask, labels=labels).loss.backward()
        return {name: param.grad.clone() for name, param in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing_enable()
    checkpointed = grads()
    model.eval()
    evaluated = grads()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=0, rtol=0, msg=name)
        torch.testing.assert_close(evaluated[name], grad, atol=0, rtol=0, msg=name)


def test_num_label_tokens_leaves_ignored_tokens_out_of_the_loss(tmp_path):
    """The collator's label count lets the loss skip the ignored tokens: same loss and gradients as without it (and
    as transformers); a count that does not match the shifted labels raises."""
    hf, model = hf_and_veofast("llama", tmp_path)
    input_ids = _batch(hf.config.vocab_size)
    mask, labels = _padded(input_ids)
    count = int((labels != -100).sum())  # what the collators count: each row's first label is already -100
    hf_loss = hf(input_ids, attention_mask=mask, labels=labels).loss
    out = model(input_ids, attention_mask=mask, labels=labels, num_label_tokens=count)
    torch.testing.assert_close(out.loss, hf_loss, **LOSS_TOL)
    out.loss.backward()
    counted = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()
    model(input_ids, attention_mask=mask, labels=labels).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(counted[name], param.grad, atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match=f"num_label_tokens={count + 1}"):
        model(input_ids, attention_mask=mask, labels=labels, num_label_tokens=count + 1)
