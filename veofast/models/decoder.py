"""The decoder-only causal LM: embeddings -> decoder layers -> final norm -> LM head with a fused loss.

One class serves Llama 3, Qwen2/2.5, Qwen3 (qk-norm) and Qwen2/Qwen3-MoE; ``DecoderConfig`` says which
features are on. Inputs are HF-style; a packed micro-batch (``input_ids (1, T)``, ``cu_seqlens``,
``max_seqlen``, ``position_ids``) runs attention per document without padding. Parameter names match the
transformers 5 in-memory names (``model.layers.0.self_attn.q_proj.weight``, ``...mlp.experts.gate_up_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from veofast.ops import fused_linear_cross_entropy

from .config import DecoderConfig
from .init import init_parameter
from .layers import MLP, Attention, RMSNorm
from .moe import SparseMoeBlock, load_balancing_loss
from .rotary import rotary_frequencies

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    """``loss``: LM loss (+ aux loss when the config enables it); ``logits (B, T, V)`` only without labels;
    ``aux_loss``: the MoE load-balancing loss (None for dense models); ``lm_loss``: the loss without it."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None

    def __getitem__(self, key: str):
        return getattr(self, key)


# A pytree node, like transformers' ModelOutput: FSDP2 finds the loss in it to hook the root's backward.
torch.utils._pytree.register_dataclass(CausalLMOutput)


def _row_positions(position_ids: torch.Tensor | None, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """``position_ids`` None, ``(T,)``, ``(1, T)`` or ``(B, T)`` -> ``(B, T)`` (``0..T-1`` in every row when None)."""
    if position_ids is None:
        return torch.arange(seq_len, device=device).expand(batch, seq_len)
    rows = position_ids.numel() // seq_len if position_ids.shape[-1] == seq_len else -1
    if position_ids.dim() > 2 or rows not in (1, batch):
        raise ValueError(
            f"position_ids must be (batch, seq_len) = ({batch}, {seq_len}) or (1, {seq_len}), got shape "
            f"{tuple(position_ids.shape)}"
        )
    return position_ids.reshape(-1, seq_len).expand(batch, seq_len)


def _check_labels(input_ids: torch.Tensor, *, labels: torch.Tensor | None, shift_labels: torch.Tensor | None) -> None:
    """ValueError unless ``labels`` / ``shift_labels``, at most one of them, have ``input_ids``' shape ``(B, T)``: a
    flat ``(B * T,)`` vector would shift each row's first label into the previous row."""
    if labels is not None and shift_labels is not None:
        raise ValueError("give labels (unshifted) or shift_labels (already shifted), not both")
    for name, value in (("labels", labels), ("shift_labels", shift_labels)):
        if value is not None and value.shape != input_ids.shape:
            raise ValueError(
                f"{name} must have input_ids' shape (batch, seq_len) = {tuple(input_ids.shape)}, got "
                f"{tuple(value.shape)}"
            )


def padding_layout(attention_mask: torch.Tensor, batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention segments of a padded batch: ``attention_mask (B, T)`` (1 = token, 0 = padding) ->
    ``(cu_seqlens (3B + 1,) int32, token_mask (B * T,) bool)``.

    Each row is cut into three segments, some possibly empty: the left padding, the tokens, the right padding; so
    tokens attend only to the tokens of their row. A row whose ones are not contiguous (inner padding), which
    segments cannot express, is refused: with a ValueError for a CPU mask, and on an accelerator by a device-side
    assertion with the same message (no host synchronisation).
    """
    if tuple(attention_mask.shape) != (batch, seq_len):
        raise ValueError(
            f"attention_mask must be a (batch, seq_len) = ({batch}, {seq_len}) padding mask, got shape "
            f"{tuple(attention_mask.shape)}"
        )
    mask = attention_mask.bool()
    first = mask.int().argmax(dim=1)
    count = mask.sum(dim=1)
    columns = torch.arange(seq_len, device=mask.device)
    contiguous = (columns >= first[:, None]) & (columns < (first + count)[:, None])
    message = (
        "attention_mask has padding between tokens of a row; only left and right padding are supported: pack the "
        "documents and pass cu_seqlens / position_ids instead"
    )
    if mask.device.type == "cpu":
        if not torch.equal(contiguous, mask):
            raise ValueError(message)
    else:
        torch._assert_async((contiguous == mask).all(), message)
    row_start = torch.arange(batch, device=mask.device) * seq_len
    bounds = torch.stack([row_start, row_start + first, row_start + first + count], dim=1).reshape(-1)
    total = bounds.new_full((1,), batch * seq_len)
    return torch.cat([bounds, total]).to(torch.int32), mask.reshape(-1)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``.

    The residual stream travels as a pair ``(hidden, residual)`` whose sum is the stream: each layer's input norm
    adds the previous layer's MLP output to the stream inside its kernel (``rms_norm(..., residual=)``), and so does
    the final norm after the last layer. This saves two (tokens, hidden) adds per layer: the forward's ``h + mlp``
    and, in the backward, the sum of the two gradients of ``h`` (the fused norm's kernel adds the incoming stream
    gradient)."""

    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config)
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
            self.mlp = SparseMoeBlock(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, config.ops_backend)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.ops_backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.ops_backend)

    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        inv_freq: torch.Tensor,
        rope_scaling: float,
        residual: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Stream ``hidden + residual`` (``hidden`` alone when ``residual`` is None), each ``(N, H)`` -> ``(out,
        residual, router_stats (2, E) or None)``, the stream after the layer being ``out + residual``.
        ``token_mask (N,)`` bool (None: all) marks the tokens the router statistics count (padding is left out)."""
        if residual is None:
            normed, residual = self.input_layernorm(hidden), hidden
        else:
            normed, residual = self.input_layernorm(hidden, residual=residual)
        attn = self.self_attn(normed, position_ids, cu_seqlens, max_seqlen, inv_freq, rope_scaling)
        normed, residual = self.post_attention_layernorm(attn, residual=residual)
        if self.is_moe:
            out, stats = self.mlp(normed, token_mask=token_mask)
        else:
            out, stats = self.mlp(normed), None
        return out, residual, stats


class DecoderModel(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's ``model.`` prefix)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.ops_backend)


class CausalLM(nn.Module):
    """Decoder-only LM with an HF-compatible ``forward`` and a fused linear cross-entropy loss."""

    _no_split_modules = ["DecoderLayer"]

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq, scaling = rotary_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_scaling = scaling
        self.gradient_checkpointing = False
        # set by veofast.distributed.load_balancing to form the load-balancing loss over the global batch
        self.router_stats_reducer = None

    # ------------------------------------------------------------------------------------------ initialisation

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Random init as transformers does (normal(0, initializer_range) for Linear, Embedding and expert
        weights; ones for norms; zero biases), then the RoPE buffers.

        Each parameter draws from its own generator seeded by ``seed`` and its name, and a sharded parameter
        (a DTensor) fills its local shard from the same full tensor: the weights are identical whatever the
        world size or sharding.
        """
        for name, param in self.named_parameters():
            init_parameter(param, name, seed, self.config.initializer_range)
        self.init_buffers()

    def _apply(self, fn, recurse: bool = True):
        """``Module._apply`` (behind ``to``, ``bfloat16()``, ``cuda()``, ``to_empty``), leaving the RoPE frequencies
        in fp32: a cast to bf16 would round them by up to 0.4%, which puts the angles of late positions off by
        radians (0.7 at position 4096 for head_dim 32); the forward's upcast could not undo it."""
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != inv_freq.dtype:
            self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Fill the non-persistent buffers (needed after ``to_empty`` from the meta device)."""
        inv_freq, _ = rotary_frequencies(self.config)
        self.inv_freq.copy_(inv_freq.to(self.inv_freq.device))

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each decoder layer's activations in backward instead of storing them."""
        self.gradient_checkpointing = True

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    # ------------------------------------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        attention_mask: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        num_label_tokens: int | None = None,
        use_cache: bool | None = None,
        past_key_values=None,
    ) -> CausalLMOutput:
        """Run the LM on ``input_ids (B, T)``.

        Packed micro-batches (B == 1) pass ``cu_seqlens (docs + 1,) int32``, ``max_seqlen`` and
        ``position_ids (1, T)`` restarting per document. Without ``cu_seqlens`` each row is one document;
        ``attention_mask (B, T)`` may pad rows on the left and/or the right (its ones contiguous in each row, checked
        without a host sync on an accelerator): tokens attend only to the unpadded tokens of their row and the MoE
        load-balancing loss counts only those, as in transformers. ``position_ids`` default to ``0..T-1`` in
        every row (pads included, as transformers' forward does); ``(1, T)`` is broadcast over the rows.

        ``labels (B, T)`` are HF-style (the model shifts them); ``shift_labels (B, T)`` are already shifted
        (position t holds the label that logits at t predict; used under sequence parallelism); give at most one, and
        ``attention_mask`` or ``cu_seqlens``, not both (ValueError). The loss is
        the sum over label tokens divided by ``num_items_in_batch`` when given (the loop passes the global
        label-token count of the step), else the mean over this micro-batch's label tokens.
        ``num_label_tokens``, the collator's count of this micro-batch's label tokens (those of the shifted labels
        other than -100; the collators set each document's first label to -100 so that shifting keeps the count),
        lets the loss leave the other tokens out of its matmuls; a wrong count raises (a device-side assertion on
        an accelerator).

        A training model: there is no KV cache, so ``use_cache=True`` or ``past_key_values`` raise ValueError.
        """
        if use_cache or past_key_values is not None:
            raise ValueError(
                "CausalLM has no KV cache (use_cache=True / past_key_values given): it runs training and full-sequence "
                "forwards only; save it with save_hf_weights and generate with transformers"
            )
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        batch, seq_len = input_ids.shape
        _check_labels(input_ids, labels=labels, shift_labels=shift_labels)
        if attention_mask is not None and cu_seqlens is not None:
            raise ValueError(
                "attention_mask (padded rows) and cu_seqlens (packed documents) were both given; pass one: the "
                "mask would be ignored"
            )
        device = input_ids.device
        position_ids = _row_positions(position_ids, batch, seq_len, device)
        token_mask = None
        if attention_mask is not None:
            cu_seqlens, token_mask = padding_layout(attention_mask, batch, seq_len)
            max_seqlen = seq_len
        elif cu_seqlens is None:
            cu_seqlens = torch.arange(batch + 1, device=device, dtype=torch.int32) * seq_len
            max_seqlen = seq_len
        elif max_seqlen is None:
            raise ValueError("max_seqlen (a Python int) must be given with cu_seqlens")
        elif batch != 1:
            raise ValueError(f"packed inputs (cu_seqlens given) must have batch size 1, got {batch}")

        hidden = self.model.embed_tokens(input_ids).view(batch * seq_len, self.config.hidden_size)
        flat_positions = position_ids.reshape(-1)
        inv_freq = self.inv_freq  # fp32 whatever the module's dtype (see _apply)
        residual = None
        stats_sum = None
        num_moe_layers = 0
        for layer in self.model.layers:
            args = (hidden, flat_positions, cu_seqlens, max_seqlen, inv_freq, self.rope_scaling, residual, token_mask)
            if self.gradient_checkpointing and self.training:
                hidden, residual, stats = checkpoint(layer, *args, use_reentrant=False)
            else:
                hidden, residual, stats = layer(*args)
            if stats is not None:
                stats_sum = stats if stats_sum is None else stats_sum + stats
                num_moe_layers += 1
        hidden = self.model.norm(hidden) if residual is None else self.model.norm(hidden, residual=residual)[0]

        aux_loss = None
        if stats_sum is not None:
            num_routed = num_moe_layers * (batch * seq_len if token_mask is None else token_mask.sum())
            if self.router_stats_reducer is not None:
                stats_sum, num_routed = self.router_stats_reducer(stats_sum, num_routed)
            aux_loss = load_balancing_loss(stats_sum, num_routed)

        if labels is None and shift_labels is None:
            # reshaped before the projection, so that the output is the projection's own tensor, not a view of it
            # (FSDP2 drops its pre-backward hook on a root module's view outputs)
            logits = self.lm_head(hidden.view(batch, seq_len, self.config.hidden_size))
            return CausalLMOutput(logits=logits, aux_loss=aux_loss)
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        lm_loss = fused_linear_cross_entropy(
            hidden,
            self.lm_head.weight,
            shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            num_items_in_batch=num_items_in_batch,
            num_label_tokens=num_label_tokens,
            backend=self.config.ops_backend,
        )
        loss = lm_loss
        if aux_loss is not None and self.config.output_router_logits:
            loss = lm_loss + self.config.router_aux_loss_coef * aux_loss
        return CausalLMOutput(loss=loss, aux_loss=aux_loss, lm_loss=lm_loss)
