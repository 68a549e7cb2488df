"""Sparsifiner training losses (the official two-phase schedule, ``src/losses.py`` of lim142857/Sparsifiner).

- Phase 1 ("attn_recon", predictor only, dense attention): ``0.01 · mean over layers of Σ (Ã - A_teacher)²`` with
  the teacher's attention without its class-token query row (:func:`attn_recon_loss`; the official MSE uses
  ``reduction='sum'``, so it scales with the batch size; ``reduction='mean'`` is offered beside it).
- Phase 2 ("cls_distill", backbone only, sparse attention): ``1.0 · CE(logits, target)
  + 0.5 · KL(teacher ‖ student) on the logits (batch mean) + 0.5 · MSE(final normed patch tokens, teacher's)``
  (:func:`distill_loss`); with token pruning, the token MSE runs over the surviving tokens only.

The teacher is the frozen dense model: either a Sparsifiner built with ``attn_keep_rate=1.0`` from the same DeiT
checkpoint (its dense path is exactly DeiT) or a timm ``VisionTransformer`` (e.g. ``deit_small_patch16_224``), whose
attention maps are recomputed by hooks (:func:`teacher_outputs`).

Typical loop::

    student.set_training_phase('attn_recon')       # phase 1: predictor trainable, dense attention in train mode
    crit = SparsifinerLoss(teacher, phase='attn_recon')
    loss, parts = crit(x, student.forward_dict(x), y)
    ...
    student.set_training_phase('distill')          # phase 2: backbone trainable, sparse attention
    crit = SparsifinerLoss(teacher, phase='distill')
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['attn_recon_loss', 'cls_distill_loss', 'token_distill_loss', 'distill_loss', 'teacher_outputs',
           'SparsifinerLoss']


def attn_recon_loss(
        approx_attn: Sequence[Optional[torch.Tensor]],
        teacher_attn: Sequence[torch.Tensor],
        num_prefix_tokens: int = 1,
        reduction: str = 'sum',
) -> torch.Tensor:
    """Phase-1 loss (unweighted): mean over layers of the squared error between Ã and the teacher's attention.

    Args:
        approx_attn: Per layer the student's approximate attention (B, H, n - prefix, n) (``forward_dict``'s
            ``approx_attn``; run the student in train mode with ``attn_recon`` so every layer has one).
        teacher_attn: Per layer the teacher's attention probabilities (B, H, n, n) (prefix query rows are dropped) or
            already (B, H, n - prefix, n).
        num_prefix_tokens: Leading non-patch tokens.
        reduction: 'sum' (official: summed over B·H·(n-1)·n) or 'mean'.
    """
    if reduction not in ('sum', 'mean'):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if len(approx_attn) != len(teacher_attn):
        raise ValueError(f'{len(approx_attn)} student layers but {len(teacher_attn)} teacher attention maps')
    total, layers = 0., 0
    for i, (a, t) in enumerate(zip(approx_attn, teacher_attn)):
        if a is None:
            raise ValueError(f'layer {i} has no approximate attention (dense in eval: run the student in train mode '
                             f'with attn_recon=True, or give it a keep rate < 1)')
        if t.shape[-2] == a.shape[-2] + num_prefix_tokens:
            t = t[..., num_prefix_tokens:, :]
        if t.shape != a.shape:
            raise ValueError(f'layer {i}: approximate attention {tuple(a.shape)} vs teacher {tuple(t.shape)}')
        total = total + F.mse_loss(a, t.to(a.dtype), reduction=reduction)
        layers += 1
    return total / max(layers, 1)


def cls_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) on the logits, batch mean (``F.kl_div(..., 'batchmean', log_target=True)``)."""
    return F.kl_div(F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1),
                    reduction='batchmean', log_target=True)


def token_distill_loss(
        student_tokens: torch.Tensor,
        teacher_tokens: torch.Tensor,
        token_idx: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MSE between the final normed patch tokens, over the student's surviving tokens.

    Args:
        student_tokens: (B, kept, C).
        teacher_tokens: (B, patches, C).
        token_idx: (B, kept) grid indices of the student's tokens (None: all patches, in order).
    """
    if token_idx is not None:
        index = token_idx.unsqueeze(-1).expand(-1, -1, teacher_tokens.shape[-1])
        teacher_tokens = torch.gather(teacher_tokens, 1, index)
    if student_tokens.shape != teacher_tokens.shape:
        raise ValueError(f'student tokens {tuple(student_tokens.shape)} vs teacher {tuple(teacher_tokens.shape)}')
    return F.mse_loss(student_tokens, teacher_tokens.to(student_tokens.dtype))


def _task_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if target.dtype.is_floating_point and target.shape == logits.shape:  # mixup / cutmix soft targets
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, target)


def distill_loss(
        student_out: Dict,
        teacher_out: Dict,
        target: torch.Tensor,
        cls_weight: float = 1.0,
        cls_distill_weight: float = 0.5,
        token_distill_weight: float = 0.5,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Phase-2 loss: ``cls_weight · CE + cls_distill_weight · KL + token_distill_weight · token MSE``.

    Args:
        student_out: ``forward_dict`` of the student (``logits``, ``features``, ``token_idx``).
        teacher_out: :func:`teacher_outputs` of the teacher (``logits``, ``features``).
        target: Class indices (B,) or soft targets (B, classes).
        cls_weight: Weight of the task loss (official 1.0).
        cls_distill_weight: Weight of the logit KL (official 0.5).
        token_distill_weight: Weight of the token MSE (official 0.5).

    Returns:
        (total loss, dict of the weighted components).
    """
    parts = {
        'cls_loss': cls_weight * _task_loss(student_out['logits'], target),
        'cls_distill_loss': cls_distill_weight * cls_distill_loss(student_out['logits'], teacher_out['logits']),
        'token_distill_loss': token_distill_weight * token_distill_loss(
            student_out['features'], teacher_out['features'], student_out.get('token_idx')),
    }
    return sum(parts.values()), parts


def _timm_attention_map(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention of a timm ``Attention`` module for its input x (B, N, C)."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, x: torch.Tensor, return_attn: bool = True) -> Dict:
    """Logits, final normed patch tokens and (optionally) per-layer attention maps of a frozen dense teacher.

    Args:
        teacher: A Sparsifiner (anything with ``forward_dict``), or a timm ``VisionTransformer`` whose blocks use
            timm's ``Attention``.
        x: Images.
        return_attn: Also return the per-layer attention probabilities (B, H, n, n) (needed in phase 1).
    """
    if hasattr(teacher, 'forward_dict'):
        out = teacher.forward_dict(x, return_attn=return_attn)
        return dict(logits=out['logits'], features=out['features'], attn=out.get('attn'))
    maps: List[torch.Tensor] = []
    hooks = []
    if return_attn:
        for blk in teacher.blocks:
            hooks.append(blk.attn.register_forward_hook(
                lambda m, inp, out: maps.append(_timm_attention_map(m, inp[0]))))
    try:
        feats = teacher.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    npt = getattr(teacher, 'num_prefix_tokens', 1)
    return dict(logits=teacher.forward_head(feats), features=feats[:, npt:], attn=maps if return_attn else None)


class SparsifinerLoss(nn.Module):
    """The official loss of one phase, with the frozen teacher inside.

    Args:
        teacher: Frozen dense teacher (see :func:`teacher_outputs`); put in eval mode, its parameters frozen.
        phase: 'attn_recon' (phase 1) or 'distill' (phase 2).
        attn_recon_weight: Phase-1 weight (official 0.01).
        attn_recon_reduction: 'sum' (official) or 'mean'.
        cls_weight: Phase-2 task-loss weight (official 1.0).
        cls_distill_weight: Phase-2 logit-KL weight (official 0.5).
        token_distill_weight: Phase-2 token-MSE weight (official 0.5).
    """

    def __init__(
            self,
            teacher: nn.Module,
            phase: str = 'distill',
            attn_recon_weight: float = 0.01,
            attn_recon_reduction: str = 'sum',
            cls_weight: float = 1.0,
            cls_distill_weight: float = 0.5,
            token_distill_weight: float = 0.5,
    ):
        super().__init__()
        if phase not in ('attn_recon', 'distill'):
            raise ValueError(f"phase must be 'attn_recon' or 'distill', got {phase!r}")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.phase = phase
        self.attn_recon_weight = attn_recon_weight
        self.attn_recon_reduction = attn_recon_reduction
        self.cls_weight = cls_weight
        self.cls_distill_weight = cls_distill_weight
        self.token_distill_weight = token_distill_weight

    def train(self, mode: bool = True) -> 'SparsifinerLoss':
        super().train(mode)
        self.teacher.eval()  # the teacher stays frozen in eval mode
        return self

    def forward(
            self,
            inputs: torch.Tensor,
            student_out: Dict,
            target: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(total loss, weighted components) for images ``inputs`` and the student's ``forward_dict`` output."""
        teacher = teacher_outputs(self.teacher, inputs, return_attn=self.phase == 'attn_recon')
        if self.phase == 'attn_recon':
            loss = self.attn_recon_weight * attn_recon_loss(
                student_out['approx_attn'], teacher['attn'], reduction=self.attn_recon_reduction)
            return loss, {'attn_recon_loss': loss}
        if target is None:
            raise ValueError("phase 'distill' needs a target")
        return distill_loss(student_out, teacher, target, self.cls_weight, self.cls_distill_weight,
                            self.token_distill_weight)
