"""Training losses over the model's hidden states; objectives (SFT, preference, pretraining) share them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nomoat.model.llama import LlamaForCausalLM

IGNORE_INDEX = -100  # a label that carries no loss (prompt tokens, padding)

PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")


def token_logps(model: LlamaForCausalLM, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """log p(target | hidden) for rows of hidden states [N, H] and their next tokens [N]: float32 [N].

    The vocabulary projection is the largest activation of a small model (tokens x 49k floats);
    projecting only the scored positions, in checkpointed chunks, keeps it out of memory.
    """

    def piece(hc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(model.lm_head(hc).float(), yc, reduction="none")

    parts = []
    for s in range(0, targets.numel(), chunk):
        hc, yc = hidden[s:s + chunk], targets[s:s + chunk]
        if torch.is_grad_enabled() and hc.requires_grad:
            parts.append(checkpoint(piece, hc, yc, use_reentrant=False))
        else:
            parts.append(piece(hc, yc))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def causal_lm_loss(
    model: LlamaForCausalLM,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    chunk: int = 512,
    reduction: str = "mean",
) -> torch.Tensor:
    """Next-token cross-entropy computed only where labels carry loss (mean or sum over those tokens)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        return hidden.sum() * 0.0
    total = -token_logps(model, h[keep], y[keep], chunk).sum()
    return total / n if reduction == "mean" else total


@dataclass
class PreferenceLoss:
    """One of the preference losses and its settings.

    kind: sigmoid (DPO; label_smoothing > 0 is conservative DPO), robust (robust DPO, label_smoothing the
        assumed rate of flipped labels), hinge (SLiC), ipo (on per-token averaged log-ratios), orpo and simpo
        (reference-free, on per-token averaged log-probabilities).
    beta: DPO's beta / IPO's tau / ORPO's lambda / SimPO's beta.
    simpo_gamma: SimPO's target margin (in reward units, as in its paper's gamma).
    """

    kind: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5

    @property
    def uses_reference(self) -> bool:
        return self.kind not in REFERENCE_FREE


@dataclass
class PreferenceTerms:
    """Per-pair results of a preference loss: the loss and the implicit rewards (all [B])."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def preference_loss(spec: PreferenceLoss, chosen: torch.Tensor, rejected: torch.Tensor, n_chosen: torch.Tensor,
                    n_rejected: torch.Tensor, ref_chosen: torch.Tensor | None = None,
                    ref_rejected: torch.Tensor | None = None) -> PreferenceTerms:
    """Per-pair loss and rewards from summed completion log-probabilities.

    Args:
        chosen, rejected: the policy's log p(completion | prompt), summed over the completion's tokens [B].
        n_chosen, n_rejected: the completions' scored token counts [B].
        ref_chosen, ref_rejected: the reference policy's sums [B] (not used by orpo / simpo).

    Rewards are beta * (policy - reference) summed log-ratios for the reference-based losses (DPO's implicit
    reward), and beta * the per-token average log-probability for the reference-free ones.
    """
    beta, eps = spec.beta, spec.label_smoothing
    if not spec.uses_reference:
        avg_c, avg_r = chosen / n_chosen.clamp(min=1), rejected / n_rejected.clamp(min=1)
        if spec.kind == "simpo":
            # SimPO: -log sigmoid(beta * (avg_c - avg_r) - gamma)
            loss = -F.logsigmoid(beta * (avg_c - avg_r) - spec.simpo_gamma)
        else:
            # ORPO: NLL of the chosen completion + lambda * -log sigmoid(log odds_c - log odds_r),
            # odds = p / (1 - p) with p the per-token average probability; log1p(-exp(x)) keeps it finite.
            log_odds = (avg_c - avg_r) - (torch.log1p(-torch.exp(avg_c)) - torch.log1p(-torch.exp(avg_r)))
            loss = -avg_c - beta * F.logsigmoid(log_odds)
        return PreferenceTerms(loss, beta * avg_c.detach(), beta * avg_r.detach())
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"the {spec.kind} loss needs the reference log-probabilities")
    ratio_c, ratio_r = chosen - ref_chosen, rejected - ref_rejected
    delta = ratio_c - ratio_r
    if spec.kind == "sigmoid":
        loss = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif spec.kind == "robust":
        # Unbiased under a label-flip rate eps (Chowdhury et al. 2024).
        loss = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif spec.kind == "hinge":
        loss = torch.relu(1 - beta * delta)
    elif spec.kind == "ipo":
        # IPO regresses the per-token averaged log-ratio difference onto 1 / (2 tau).
        avg_delta = ratio_c / n_chosen.clamp(min=1) - ratio_r / n_rejected.clamp(min=1)
        loss = (avg_delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {spec.kind!r} (expected one of {', '.join(PREFERENCE_LOSSES)})")
    return PreferenceTerms(loss, beta * ratio_c.detach(), beta * ratio_r.detach())
