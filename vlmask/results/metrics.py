"""Pure metric functions: how far a knockout moved a vector or a distribution.

All metrics are computed in float32, whatever dtype the model ran in.
"""

from __future__ import annotations

import torch

VECTOR_METRICS = ("l2", "cosine", "rel_l2")
LOGIT_METRICS = ("kl", "logprob_drop", "prob_change_pct", "top_changed")


def vector_distances(clean: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """``(..., 3)``: L2 distance, cosine distance (1 - cos) and relative L2 along the last dim.

    Identical vectors give exactly 0 for all three, whatever the CPU's float path; the
    cosine distance is computed as half the squared distance of the unit vectors, so it
    is never negative either.

    Example:
        >>> [round(x, 3) for x in vector_distances(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0])).tolist()]
        [4.0, 0.4, 0.8]
    """
    clean, masked = torch.broadcast_tensors(clean.float(), masked.float())
    l2 = torch.linalg.vector_norm(masked - clean, dim=-1)
    norm = torch.linalg.vector_norm(clean, dim=-1, keepdim=True).clamp_min(1e-12)
    unit_masked = masked / torch.linalg.vector_norm(masked, dim=-1, keepdim=True).clamp_min(1e-12)
    # 1 - cos = |a/|a| - b/|b||^2 / 2: exactly 0 for identical vectors on any CPU, never negative
    cosine = torch.linalg.vector_norm(unit_masked - clean / norm, dim=-1).square() / 2
    rel = l2 / norm.squeeze(-1)
    return torch.stack([l2, cosine, rel], dim=-1)


def logit_metrics(
    clean_logits: torch.Tensor, masked_logits: torch.Tensor, target: torch.Tensor | None = None
) -> torch.Tensor:
    """``(..., 4)``: KL(clean || masked), log-prob drop of the measured token, relative change of its
    probability in percent, and whether the top token changed (0/1).

    The measured token is ``target`` (token ids broadcastable to the logits' leading dims, such
    as the answer's tokens), or the clean top token when None. KL and ``top_changed`` (the masked
    top token is not the clean top token) are about the distributions, whatever the target.

    Example:
        >>> same = torch.tensor([2.0, 0.0])
        >>> logit_metrics(same, same).tolist()
        [0.0, 0.0, 0.0, 0.0]
        >>> [round(x, 3) for x in logit_metrics(same, torch.tensor([0.0, 0.0]), torch.tensor(1)).tolist()]
        [0.328, -1.434, 319.453, 0.0]
    """
    clean_logits, masked_logits = torch.broadcast_tensors(clean_logits, masked_logits)
    clean_lp = torch.log_softmax(clean_logits.float(), dim=-1)
    masked_lp = torch.log_softmax(masked_logits.float(), dim=-1)
    kl = (clean_lp.exp() * (clean_lp - masked_lp)).sum(-1).clamp_min(0.0)
    top = clean_lp.argmax(-1, keepdim=True)
    measured = top if target is None else target.to(top).expand(top.shape[:-1]).unsqueeze(-1)
    clean_top = clean_lp.gather(-1, measured).squeeze(-1)
    masked_top = masked_lp.gather(-1, measured).squeeze(-1)
    change_pct = torch.expm1(masked_top - clean_top) * 100.0
    changed = (masked_lp.argmax(-1) != top.squeeze(-1)).float()
    return torch.stack([kl, clean_top - masked_top, change_pct, changed], dim=-1)
