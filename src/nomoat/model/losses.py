"""Training losses over the model's hidden states; objectives (SFT, preference, pretraining) share them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nomoat.model.llama import LlamaForCausalLM

IGNORE_INDEX = -100  # a label that carries no loss (prompt tokens, padding)


def causal_lm_loss(
    model: LlamaForCausalLM,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    chunk: int = 512,
    reduction: str = "mean",
) -> torch.Tensor:
    """Next-token cross-entropy computed only where labels carry loss.

    The vocabulary projection is the largest activation of a small model
    (tokens x 49k floats); projecting only the supervised positions, in
    checkpointed chunks, keeps it out of memory.
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE_INDEX
    h, y = h[keep], y[keep]
    n = y.numel()
    if n == 0:
        return hidden.sum() * 0.0

    def piece(hc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model.lm_head(hc).float(), yc, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk):
        hc, yc = h[s:s + chunk], y[s:s + chunk]
        if torch.is_grad_enabled() and hc.requires_grad:
            total = total + checkpoint(piece, hc, yc, use_reentrant=False)
        else:
            total = total + piece(hc, yc)
    return total / n if reduction == "mean" else total
