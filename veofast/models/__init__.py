"""veofast's own model definitions (Llama 3, Qwen2/2.5, Qwen3, Qwen2/3-MoE) and their builders."""

from .auto import build_config, build_foundation_model, build_tokenizer, materialize_model
from .config import DecoderConfig
from .decoder import CausalLM, CausalLMOutput, DecoderLayer

__all__ = [
    "CausalLM",
    "CausalLMOutput",
    "DecoderConfig",
    "DecoderLayer",
    "build_config",
    "build_foundation_model",
    "build_tokenizer",
    "materialize_model",
]
