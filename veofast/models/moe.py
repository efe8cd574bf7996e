"""The sparse MoE block of Qwen2-MoE / Qwen3-MoE: a softmax top-k router and SwiGLU experts stored as
stacked tensors (the transformers 5 layout), plus the optional gated shared expert of Qwen2-MoE.

Experts are computed by ``veofast.ops.moe_ffn`` (permute -> grouped GEMMs -> unpermute). For expert
parallelism the distributed layer sets ``block.experts.dispatcher`` to an object with the same call
signature as ``moe_ffn`` (plus ``side``: the shared expert, which it computes while its combine is in flight)
that moves tokens to the ranks owning their experts; the model itself knows nothing of meshes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from veofast.ops import moe_ffn

from .config import DecoderConfig
from .layers import MLP


class Experts(nn.Module):
    """``num_experts`` SwiGLU FFNs: ``gate_up_proj (E, 2I, H)`` (gate rows first), ``down_proj (E, H, I)``."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, backend: str = "auto"):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.backend = backend
        self.dispatcher = None  # set by veofast.distributed.expert_parallel for EP > 1

    def forward(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, side=None
    ) -> torch.Tensor:
        """``hidden (N, H)``, ``topk_ids / topk_weights (N, K)`` -> weighted sum of expert outputs ``(N, H)``,
        plus ``side()`` if given (an ``(N, H)`` term that an EP dispatcher computes under its combine)."""
        weights = (self.gate_up_proj, self.down_proj)
        # ids from the router's top-k over num_experts are in range: no check (it would cost a host sync)
        if self.dispatcher is not None:
            return self.dispatcher(
                hidden, topk_ids, topk_weights, *weights, check_ids=False, backend=self.backend, side=side
            )
        out = moe_ffn(hidden, topk_ids, topk_weights, *weights, check_ids=False, backend=self.backend)
        return out if side is None else out + side()


class SparseMoeBlock(nn.Module):
    """Router + experts (+ shared expert). Returns the output and the router statistics for the aux loss."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size, config.ops_backend)
        if config.shared_expert_intermediate_size:
            self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size, config.ops_backend)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def route(
        self, hidden: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``hidden (N, H)`` -> ``topk_ids (N, K)``, ``topk_weights (N, K)``, ``router_stats (2, E)`` fp32 (float64 for
        a float64 model: the softmax, top-k and statistics run in fp32 or the gate's dtype, whichever is wider).

        ``router_stats`` holds, per expert, the number of (token, slot) assignments and the summed router
        probability over the N tokens (over those ``token_mask (N,)`` bool marks, when given): what the
        load-balancing loss needs, summable across layers and ranks.
        """
        logits = self.gate(hidden)
        probs = F.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        topk_weights, topk_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        counted = torch.ones_like(topk_ids, dtype=probs.dtype)
        if token_mask is not None:
            counted = counted * token_mask[:, None]
            probs = probs * token_mask[:, None]
        counts = torch.zeros(self.num_experts, device=hidden.device, dtype=probs.dtype)
        counts.scatter_add_(0, topk_ids.reshape(-1), counted.reshape(-1))
        stats = torch.stack([counts, probs.sum(dim=0)])
        return topk_ids, topk_weights.to(logits.dtype), stats

    def forward(
        self, hidden: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden (N, H)`` -> ``(out (N, H), router_stats (2, E))``; ``token_mask (N,)`` as in ``route``."""
        topk_ids, topk_weights, stats = self.route(hidden, token_mask)
        shared = None
        if self.shared_expert is not None:

            def shared():
                return torch.sigmoid(self.shared_expert_gate(hidden)) * self.shared_expert(hidden)

        return self.experts(hidden, topk_ids, topk_weights, side=shared), stats


def load_balancing_loss(router_stats: torch.Tensor, num_tokens: torch.Tensor | int) -> torch.Tensor:
    """Switch-style auxiliary loss over all MoE layers, as transformers computes it for Qwen-MoE.

    ``router_stats (2, E)``: per-expert assignment counts (over all top-k slots) and summed router
    probabilities, summed over the MoE layers (and over ranks, for a global-batch loss); ``num_tokens``: the
    number of (token, layer) pairs that went in. Returns ``E * sum_e (count_e / n) * (prob_e / n)``, 0 (not 0 / 0)
    when no token went in (an empty micro-batch, or one that is all padding).
    """
    counts, prob_sums = router_stats[0], router_stats[1]
    n = num_tokens.clamp(min=1) if isinstance(num_tokens, torch.Tensor) else max(num_tokens, 1)
    return counts.shape[0] * torch.sum(counts * prob_sums) / (n * n)
