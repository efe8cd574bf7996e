"""veofast models against transformers: logits, loss (with the MoE aux loss), gradients, packed documents, and
the round trip veofast -> ``save_hf_weights`` -> ``AutoModelForCausalLM.from_pretrained``."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import CASES, read_checkpoint, save_hf_checkpoint
from transformers import AutoModelForCausalLM

from veofast.models import build_foundation_model
from veofast.models.hf_io import save_hf_weights

LOGIT_ATOL = 1e-4


def _inputs(vocab: int, batch: int = 2, seq: int = 19, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels = input_ids.clone()
    labels[0, :5] = -100
    labels[1, -3:] = -100
    return input_ids, labels


def _load_veofast(path):
    return build_foundation_model(weights_path=str(path), init_device="cpu", ops_backend="torch")


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers(case, tmp_path):
    hf = save_hf_checkpoint(case, tmp_path / "hf")
    model = _load_veofast(tmp_path / "hf")
    input_ids, labels = _inputs(hf.config.vocab_size)

    with torch.no_grad():
        hf_logits = hf(input_ids).logits
        logits = model(input_ids).logits
    torch.testing.assert_close(logits, hf_logits, atol=LOGIT_ATOL, rtol=0)

    hf_out = hf(input_ids, labels=labels)
    out = model(input_ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, hf_out.loss, atol=1e-5, rtol=1e-5)
    if hf.config.model_type.endswith("_moe") and hf.config.output_router_logits:
        torch.testing.assert_close(out.aux_loss, hf_out.aux_loss, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out.loss, out.lm_loss)  # the aux loss is part of the loss, as in transformers

    hf_out.loss.backward()
    out.loss.backward()
    hf_grads = {name: p.grad for name, p in hf.named_parameters()}
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert grads.keys() == hf_grads.keys()
    for name, grad in grads.items():
        assert grad is not None, name
        torch.testing.assert_close(grad, hf_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")

    # veofast -> HF files -> transformers: same keys on disk as transformers writes, same logits
    save_hf_weights(model, str(tmp_path / "out"))
    assert read_checkpoint(tmp_path / "out").keys() == read_checkpoint(tmp_path / "hf").keys()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids).logits, hf_logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["qwen2", "qwen3_moe_aux"])
def test_packed_documents_match_separate_runs(case, tmp_path):
    hf = save_hf_checkpoint(case, tmp_path / "hf")
    model = _load_veofast(tmp_path / "hf")
    lengths = [7, 12]
    docs = [torch.randint(0, hf.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    cu_seqlens = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
    with torch.no_grad():
        logits = model(packed, position_ids=position_ids, cu_seqlens=cu_seqlens, max_seqlen=max(lengths)).logits
        expected = torch.cat([hf(doc).logits for doc in docs], dim=1)
    torch.testing.assert_close(logits, expected, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["qwen3", "qwen3_moe_aux"])
def test_parity_on_gpu_with_default_kernels(case, tmp_path):
    """The fused kernels (ops_backend="auto" on CUDA) against transformers' eager fp32 model on the GPU."""
    hf = save_hf_checkpoint(case, tmp_path / "hf").cuda()
    model = build_foundation_model(weights_path=str(tmp_path / "hf"), init_device="cuda", ops_backend="auto")
    input_ids, labels = (t.cuda() for t in _inputs(hf.config.vocab_size))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, hf(input_ids).logits, atol=2e-3, rtol=0)
        torch.testing.assert_close(
            model(input_ids, labels=labels).loss, hf(input_ids, labels=labels).loss, atol=1e-4, rtol=1e-4
        )
