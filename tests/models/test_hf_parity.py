"""veofast models against transformers: logits, loss (with the MoE aux loss), gradients, packed documents, and
the round trip veofast -> ``save_hf_weights`` -> ``AutoModelForCausalLM.from_pretrained``."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import CASES, hf_config, random_hf_model, read_checkpoint, save_hf_checkpoint
from transformers import AutoConfig, AutoModelForCausalLM

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


ODD_SIZES = dict(vocab_size=1001, hidden_size=72, intermediate_size=200)
LLAMA3_2 = dict(
    rope_type="llama3",
    rope_theta=5e5,
    factor=32.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8,
)
# name -> (hf_tiny case, overrides): the shapes of released checkpoints, scaled down
RELEASED_LIKE = {
    "llama3.2_tied_gqa3": ("llama", dict(tie_word_embeddings=True, num_attention_heads=6, rope_parameters=LLAMA3_2)),
    "qwen2.5_tied_mqa": ("qwen2", dict(tie_word_embeddings=True, num_attention_heads=6, num_key_value_heads=1)),
    "qwen3_moe_sparse_step": (
        "qwen3_moe_noaux",
        dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=True, head_dim=20),
    ),
}


def _as_transformers_4_wrote_it(config_path) -> None:
    """``rope_theta`` + ``rope_scaling`` and ``torch_dtype``: the spelling of most config.json files on the hub."""
    config = json.loads(config_path.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope if rope["rope_type"] != "default" else None
    config["torch_dtype"] = config.pop("dtype")
    config_path.write_text(json.dumps(config))


def _config_dict(path) -> dict:
    config = AutoConfig.from_pretrained(path).to_dict()
    for key in ("transformers_version", "_name_or_path"):
        config.pop(key, None)
    return config


@pytest.mark.parametrize("name", list(RELEASED_LIKE))
def test_released_like_checkpoint_round_trips_exactly(name, tmp_path):
    """A bf16, sharded checkpoint of odd sizes with a transformers-4 config.json: veofast computes what transformers
    computes, and saves back every tensor bit for bit and a config.json transformers reads as the same config."""
    case, overrides = RELEASED_LIKE[name]
    random_hf_model(hf_config(case, **ODD_SIZES, **overrides)).bfloat16().save_pretrained(
        tmp_path / "hf", max_shard_size="40KB"
    )
    _as_transformers_4_wrote_it(tmp_path / "hf" / "config.json")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="eager")
    model = _load_veofast(tmp_path / "hf")
    input_ids, labels = _inputs(ODD_SIZES["vocab_size"])
    with torch.no_grad():
        expected = reference.eval()(input_ids).logits
        torch.testing.assert_close(model(input_ids).logits, expected, atol=LOGIT_ATOL, rtol=0)
        torch.testing.assert_close(
            model(input_ids, labels=labels).loss, reference(input_ids, labels=labels).loss, atol=1e-5, rtol=1e-5
        )

    save_hf_weights(model, str(tmp_path / "out"), dtype=torch.bfloat16, max_shard_size="40KB")
    original, saved = read_checkpoint(tmp_path / "hf"), read_checkpoint(tmp_path / "out")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert saved.keys() == original.keys()
    for key, tensor in original.items():
        assert saved[key].dtype == tensor.dtype == torch.bfloat16 and torch.equal(saved[key], tensor), key
    assert _config_dict(tmp_path / "out") == _config_dict(tmp_path / "hf")
    assert "rope_parameters" not in json.loads((tmp_path / "out" / "config.json").read_text())  # same spelling
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids).logits, expected, atol=0, rtol=0)


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
