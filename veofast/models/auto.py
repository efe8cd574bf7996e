"""``build_foundation_model`` and ``build_tokenizer``: models from HF configs (or YAML overrides) and
tokenizers from local directories, with no hub access at run time."""

from __future__ import annotations

import logging
import os

import torch

from veofast.ops._backend import triton_interpreting

from .config import DecoderConfig, apply_overrides, check_override_keys, load_hf_config_dict
from .decoder import CausalLM

logger = logging.getLogger("veofast.models")


def build_config(
    config_path: str | None = None, *, config_overrides: dict | None = None, ops_backend: str = "auto"
) -> DecoderConfig:
    """Read ``config_path`` (a config.json or a directory holding one) and apply ``config_overrides``.

    Without ``config_path`` the overrides are the whole HF config and must name ``model_type``. An override key
    close to a key veofast reads but not it (a misspelling) is a ValueError (``config.check_override_keys``).
    """
    _check_ops_backend(ops_backend)
    base = load_hf_config_dict(config_path) if config_path else {}
    check_override_keys(config_overrides, base)
    hf = apply_overrides(base, config_overrides)
    if not hf:
        raise ValueError("build_foundation_model: give model.config_path, model.model_path or model.config_overrides")
    return DecoderConfig.from_hf_dict(hf, ops_backend=ops_backend)


def _check_ops_backend(ops_backend: str) -> None:
    """Refuse ``ops_backend="triton"`` up front on a machine whose kernels could not run (no CUDA device and no
    ``TRITON_INTERPRET=1``): it would otherwise fail only at the first forward, after the run has started."""
    if ops_backend == "triton" and not torch.cuda.is_available() and not triton_interpreting():
        raise ValueError(
            "model.ops_backend 'triton' runs the Triton kernels, which need a CUDA device, and there is none here "
            "(TRITON_INTERPRET=1 runs them slowly on the CPU, for tests); use 'auto' (Triton on CUDA, the torch "
            "reference elsewhere) or 'torch'"
        )


def _overrides_hint(config_path: str, config_overrides: dict | None, config: DecoderConfig) -> str | None:
    """Why a checkpoint does not fit the model: the ``config_overrides`` that change the state dict (names or shapes)
    of the model that ``config_path`` describes, as a sentence with the remedy; None when they change none of it.
    Typically a config file written for training from scratch (``configs/sft.yaml``) used with a checkpoint."""
    base = load_hf_config_dict(config_path)
    changed = {key: value for key, value in (config_overrides or {}).items() if base.get(key, object()) != value}
    if not changed:
        return None
    try:
        base_config = DecoderConfig.from_hf_dict(base, ops_backend=config.ops_backend)
    except ValueError:
        return None  # the overrides complete a config veofast cannot read alone
    with torch.device("meta"):
        # state-dict names (a tied lm_head.weight included): untying a checkpoint that stores lm_head is no change
        shapes = [{n: t.shape for n, t in CausalLM(c).state_dict().items()} for c in (base_config, config)]
    if shapes[0] == shapes[1]:
        return None
    listed = ", ".join(
        f"{key}: {repr(base[key]) if key in base else 'unset'} -> {value!r}" for key, value in changed.items()
    )
    return (
        f"model.config_overrides change the model that {config_path!r} describes ({listed}), so the checkpoint's "
        "weights do not fit it. To fine-tune the checkpoint as it is, drop these overrides (on the command line, "
        "--model.config_overrides '{}' replaces those of the config file); to train a new model of that shape from "
        "scratch, leave model.model_path unset"
    )


def build_foundation_model(
    config_path: str | None = None,
    weights_path: str | None = None,
    init_device: str = "meta",
    *,
    config_overrides: dict | None = None,
    ops_backend: str = "auto",
    seed: int = 0,
) -> CausalLM:
    """Build a veofast ``CausalLM``.

    ``init_device="meta"`` allocates nothing: ``build_parallelize_model`` shards the model, then
    materialises it and loads ``weights_path`` (each rank reads only its shards) or initialises it randomly.
    ``"cpu"``/``"cuda"`` build the full model there, randomly initialised with ``seed`` or loaded from
    ``weights_path`` (HF safetensors, single file or sharded with an index). Parameters have torch's default dtype
    (fp32, the master weights) whatever dtype the checkpoint stores; a bf16 checkpoint's values load exactly.
    """
    if init_device not in ("meta", "cpu", "cuda"):
        raise ValueError(f"init_device must be 'meta', 'cpu' or 'cuda', got {init_device!r}")
    if init_device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "build_foundation_model: init_device 'cuda' but there is no CUDA device here; use 'meta' (the default: "
            "build_parallelize_model then allocates each rank's shards on its device) or 'cpu'"
        )
    if weights_path is not None and not os.path.isdir(weights_path):
        raise FileNotFoundError(f"build_foundation_model: weights_path {weights_path!r} is not a directory")
    config = build_config(config_path or weights_path, config_overrides=config_overrides, ops_backend=ops_backend)
    device = torch.device("cuda", torch.cuda.current_device()) if init_device == "cuda" else torch.device(init_device)
    with device:
        model = CausalLM(config)
    model.weights_path = weights_path
    # where the config came from and what changed it, to explain a checkpoint that does not fit (materialize_model)
    model.config_source, model.config_overrides = config_path or weights_path, dict(config_overrides or {})
    if init_device != "meta":
        materialize_model(model, seed=seed)
    return model


def materialize_model(model: CausalLM, *, seed: int = 0) -> None:
    """Fill the (already allocated) parameters: load ``model.weights_path`` if set, else a seeded random init."""
    if model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        model.lm_head.weight = model.model.embed_tokens.weight  # nn.Module.to_empty from meta unties them
    if getattr(model, "weights_path", None):
        from .hf_io import load_hf_weights

        model.init_buffers()
        try:
            load_hf_weights(model, model.weights_path)
        except ValueError as exc:
            source = getattr(model, "config_source", None)
            hint = _overrides_hint(source, model.config_overrides, model.config) if source else None
            if hint is None:
                raise
            raise ValueError(f"{hint}.\n{exc}") from None  # the message holds the load's own
    else:
        model.init_weights(seed)


def build_tokenizer(tokenizer_path: str, *, trust_remote_code: bool = False):
    """Load a tokenizer with transformers' AutoTokenizer from a local directory (never from the hub)."""
    if tokenizer_path is None or not os.path.isdir(tokenizer_path):
        raise FileNotFoundError(
            f"build_tokenizer: tokenizer_path {tokenizer_path!r} is not a directory; point model.tokenizer_path "
            "at a directory with tokenizer.json / tokenizer_config.json"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ValueError(f"build_tokenizer: cannot load a tokenizer from {tokenizer_path!r}: {exc}") from exc
