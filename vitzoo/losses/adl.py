"""Attention Diversification Loss (ADL) of "Robustifying Token Attention for Vision Transformers".

Guo, Stutz, Schiele, ICCV 2023 - https://arxiv.org/abs/2303.11126
Official code: https://github.com/guoyongcs/TAPADL (``AttentionDiversificationLoss`` in ``TAPADL_FAN/main.py`` and
``TAPADL_RVT/engine.py``).

For each layer's post-softmax attention A (B, heads, N, N): M = mean over heads, s = mean of M over the query axis
(the "average attention row"), entries not above ``threshold / N`` are zeroed in both (hard threshold, no gradient
through the indicator), and the layer's similarity is the mean over batch and query tokens of cos(s, M[b, i, :]) along
the key axis. ADL = sum over layers / (L + 1e-6), exactly as the official code.

Fixed from the original: it squeezes the head-averaged map, so with batch size 1 the map loses its batch axis and the
"average row" becomes a per-query mean (always 1/N) - the loss is wrong for B = 1. Here every batch size gives the
mean of the per-sample values.

Getting the maps: the vitzoo FAN / RVT models return them with ``model(x, return_attn=True) -> (logits, [attn, ...])``.

Example:
    >>> adl = AttentionDiversificationLoss(weight=1.0, threshold=2.0)
    >>> logits, attn = model(images, return_attn=True)
    >>> loss = F.cross_entropy(logits, targets) + adl(attn)
"""
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['attention_diversification_loss', 'AttentionDiversificationLoss']


def attention_diversification_loss(attn: Sequence[torch.Tensor], threshold: float = 2.0) -> torch.Tensor:
    """Unweighted ADL of a list of attention maps.

    Args:
        attn: One post-softmax map (B, heads, N, N) per layer (N may differ between layers).
        threshold: Entries <= ``threshold / N`` are zeroed (official ``--threshold``, default 2).

    Returns:
        The scalar loss.
    """
    if len(attn) == 0:
        raise ValueError('attention_diversification_loss needs at least one attention map')
    total = 0.0
    for i, a in enumerate(attn):
        if a.dim() != 4 or a.shape[-1] != a.shape[-2]:
            raise ValueError(f'attention map {i} must be (B, heads, N, N), got {tuple(a.shape)}')
        m = a.mean(dim=1)  # (B, N, N); no squeeze, so B = 1 keeps its batch axis
        tau = threshold / m.shape[-1]
        s = m.mean(dim=1, keepdim=True)  # (B, 1, N): the average attention row
        m = m * (m > tau)
        s = s * (s > tau)
        total = total + F.cosine_similarity(s, m, dim=-1).mean()
    return total / (len(attn) + 1e-6)


class AttentionDiversificationLoss(nn.Module):
    """``weight * ADL(attn)``, see :func:`attention_diversification_loss`.

    Args:
        weight: Loss weight (official ``--adloss``, default 1).
        threshold: Threshold numerator, entries <= ``threshold / N`` are ignored (official ``--threshold``, default 2).
    """

    def __init__(self, weight: float = 1.0, threshold: float = 2.0):
        super().__init__()
        self.weight = weight
        self.threshold = threshold

    def forward(self, attn: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.weight * attention_diversification_loss(attn, self.threshold)

    def extra_repr(self) -> str:
        return f'weight={self.weight}, threshold={self.threshold}'
