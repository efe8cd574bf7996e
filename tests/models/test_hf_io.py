"""``load_hf_weights`` / ``save_hf_weights`` on one process: checkpoint layouts, tied embeddings, every kind of
mismatch reported in one error, bad paths, sharded and atomic saving."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hf_tiny import hf_config, random_hf_model, read_checkpoint, save_hf_checkpoint
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from veofast.models import build_foundation_model, build_tokenizer
from veofast.models.hf_io import load_hf_weights, parse_size, save_hf_weights


def _veofast(path, **overrides):
    return build_foundation_model(
        weights_path=str(path), init_device="cpu", ops_backend="torch", config_overrides=overrides or None
    )


def _rewrite(path, change) -> None:
    """Apply ``change(tensors)`` to the single-file checkpoint in ``path``."""
    tensors = read_checkpoint(path)
    change(tensors)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def _assert_same_as_hf(model, hf) -> None:
    expected = hf.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], atol=0, rtol=0, msg=name)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "a": 2, "b": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


# ------------------------------------------------------------------------------------------------------ loading


def test_load_sharded_checkpoint(tmp_path):
    hf = save_hf_checkpoint("qwen3_moe_aux", tmp_path, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    _assert_same_as_hf(_veofast(tmp_path), hf)


def test_load_stacked_expert_keys(tmp_path):
    """Checkpoints that already hold the stacked (E, 2I, H) / (E, H, I) expert tensors load as they are."""
    hf = random_hf_model(hf_config("qwen3_moe_aux"))
    hf.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    assert "model.layers.0.mlp.experts.gate_up_proj" in read_checkpoint(tmp_path)
    _assert_same_as_hf(_veofast(tmp_path), hf)


def test_tied_checkpoint_with_or_without_lm_head(tmp_path):
    hf = save_hf_checkpoint("llama_tied_llama3_rope", tmp_path)
    assert "lm_head.weight" not in read_checkpoint(tmp_path)
    model = _veofast(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _assert_same_as_hf(model, hf)
    _rewrite(tmp_path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    _assert_same_as_hf(_veofast(tmp_path), hf)

    # a stored lm_head that differs: transformers unties them; veofast, whose tied model cannot, refuses
    _rewrite(tmp_path, lambda t: t["lm_head.weight"].mul_(2))
    with pytest.raises(ValueError, match="holds lm_head.weight with other values .* Set tie_word_embeddings false"):
        _veofast(tmp_path)
    untied = _veofast(tmp_path, tie_word_embeddings=False)
    torch.testing.assert_close(untied.lm_head.weight, 2 * hf.lm_head.weight, atol=0, rtol=0)


def test_all_mismatches_in_one_error(tmp_path):
    save_hf_checkpoint("llama", tmp_path)

    def damage(tensors):
        del tensors["model.norm.weight"], tensors["lm_head.weight"]
        tensors["model.layers.7.mlp.extra.weight"] = torch.zeros(2)
        tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 64)
        tensors["model.rotary_emb.inv_freq"] = torch.ones(8)  # older checkpoints carry it: skipped, not unexpected

    _rewrite(tmp_path, damage)
    with pytest.raises(ValueError) as info:
        _veofast(tmp_path)
    message = str(info.value)
    assert "missing keys (2)" in message and "model.norm.weight" in message and "lm_head.weight" in message
    assert "unexpected keys (1)" in message and "model.layers.7.mlp.extra.weight" in message
    assert "shape mismatches (1)" in message and "model.layers.0.self_attn.q_proj.weight: checkpoint (3, 64)" in message


def test_quantized_dtypes_and_keys_in_two_files_are_refused(tmp_path):
    """Integer and float8 tensors are not cast (their scales would be lost), and a key two files hold is no guess."""
    save_hf_checkpoint("llama", tmp_path)

    def quantize(tensors):
        tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"].to(torch.int8)
        tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].to(
            torch.float8_e4m3fn
        )

    _rewrite(tmp_path, quantize)
    save_file({"model.norm.weight": torch.zeros(64)}, str(tmp_path / "model-extra.safetensors"))
    weight_map = {key: "model.safetensors" for key in read_checkpoint(tmp_path / "model.safetensors")}
    weight_map["model.norm.weight"] = "model-extra.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError) as info:
        _veofast(tmp_path)
    message = str(info.value)
    assert "dtypes other than F16, BF16, F32, F64 (a quantized checkpoint? dequantize it first) (2)" in message
    assert "model.layers.0.mlp.down_proj.weight: I8" in message
    assert "model.layers.1.mlp.up_proj.weight: F8_E4M3" in message
    assert "keys stored in two files (1):\n    model.norm.weight: in model-extra.safetensors and model.safetensors" in (
        message
    )


def test_missing_expert_is_named(tmp_path):
    save_hf_checkpoint("qwen2_moe", tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing keys \(1\):\n\s+model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        _veofast(tmp_path)


def test_config_that_does_not_fit_the_weights(tmp_path):
    save_hf_checkpoint("qwen2", tmp_path)
    with pytest.raises(ValueError, match=r"shape mismatches \(6\)") as info:
        _veofast(tmp_path, intermediate_size=80)
    assert "model.layers.1.mlp.down_proj.weight: checkpoint (64, 96), model (64, 80)" in str(info.value)


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights_path"):
        _veofast(tmp_path / "nowhere")
    save_hf_checkpoint("llama", tmp_path / "ok")
    model = _veofast(tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_hf_weights(model, str(tmp_path / "nowhere"))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="pytorch_model.bin.*safetensors only"):
        load_hf_weights(model, str(pickled))

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_hf_weights(model, str(empty))

    (empty / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-1.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="'model-1.safetensors', which is missing"):
        load_hf_weights(model, str(empty))

    with pytest.raises(FileNotFoundError, match="tokenizer_path"):
        build_tokenizer(str(tmp_path / "no_tokenizer"))


# ------------------------------------------------------------------------------------------------------- saving


def test_save_sharded_with_tokenizer(tmp_path):
    hf = save_hf_checkpoint("qwen3_moe_aux", tmp_path / "hf")
    model = _veofast(tmp_path / "hf")
    out = tmp_path / "out"
    save_hf_weights(model, str(out), max_shard_size="16KiB", tokenizer=_tiny_tokenizer())

    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for file in files:  # a shard is over the limit only when it holds a single tensor that is
        assert os.path.getsize(out / file) < 16 * 1024 + 4096 or len(read_checkpoint(out / file)) == 1
    tensors = read_checkpoint(out)
    assert tensors.keys() == index["weight_map"].keys() == read_checkpoint(tmp_path / "hf").keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]

    _assert_same_as_hf(_veofast(out), hf)
    _assert_same_as_hf(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), hf)
    assert build_tokenizer(str(out))("a b a")["input_ids"] == [2, 3, 2]


def test_save_dtype_and_existing_directories(tmp_path):
    save_hf_checkpoint("qwen3", tmp_path / "hf")
    model = _veofast(tmp_path / "hf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    save_hf_weights(model, str(out), dtype=torch.bfloat16)
    assert (out / "notes.txt").read_text() == "keep me"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    tensors = read_checkpoint(out)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    torch.testing.assert_close(tensors["model.norm.weight"], model.model.norm.weight.detach().bfloat16())

    with pytest.raises(ValueError, match="already holds a checkpoint"):
        save_hf_weights(model, str(out))
    with pytest.raises(ValueError, match="max_shard_size"):
        save_hf_weights(model, str(tmp_path / "other"), max_shard_size="5 parsecs")


class _CompiledLike(torch.nn.Module):
    """Holds the model as ``_orig_mod``, as torch.compile's OptimizedModule does (without importing dynamo)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self._orig_mod = module


def test_save_and_load_through_ddp_and_compile_wrappers(tmp_path):
    hf = save_hf_checkpoint("qwen2", tmp_path / "hf")
    model = _veofast(tmp_path / "hf")
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        wrapped = _CompiledLike(torch.nn.parallel.DistributedDataParallel(model))
        save_hf_weights(wrapped, str(tmp_path / "out"))
        load_hf_weights(wrapped, str(tmp_path / "out"))
    finally:
        torch.distributed.destroy_process_group()
    assert read_checkpoint(tmp_path / "out").keys() == read_checkpoint(tmp_path / "hf").keys()
    _assert_same_as_hf(_veofast(tmp_path / "out"), hf)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2MiB") == 2 * 2**20
    assert parse_size("1.5kb") == 1500
    assert parse_size(4096) == 4096
    for bad in ("", "-1GB", "0", "GB", True, 1.5):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)
