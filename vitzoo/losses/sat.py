"""SAT training losses (Wu et al., ICCV 2023, https://github.com/wpy1999/SAT ``train.py``)

``L = CE(logits, y) + area_weight * |mean_b mean_ij M_b - area_thr| + norm_weight * mean_b mean_ij M~_b (1 - M~_b)``

with ``M`` the localization map of :meth:`vitzoo.models.sat.SATVisionTransformer.forward_loc` and ``M~`` its
zero-padded 3x3 Gaussian-filtered version. The area term constrains the foreground ratio of the **whole batch** (the
per-GPU batch under DDP), not of each image, as the original: it depends on the batch size. area_thr is 0.25 for CUB
and 0.35 for ImageNet in the paper's recipes; all weights are 1.

The fixed Gaussian (the original's frozen ``nn.Parameter`` ``weight``) is a buffer of :class:`SATLoss`.
"""
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitzoo.layers.spatial_token import gaussian_filter_map, gaussian_kernel

__all__ = ['sat_area_ratio', 'sat_norm_term', 'sat_area_loss', 'sat_norm_loss', 'SATLoss']


def _as_bhw(loc_map: torch.Tensor) -> torch.Tensor:
    if loc_map.dim() == 4 and loc_map.shape[1] == 1:
        return loc_map[:, 0]
    if loc_map.dim() != 3:
        raise ValueError(f'expected a (B, h, w) or (B, 1, h, w) localization map, got shape {tuple(loc_map.shape)}')
    return loc_map


def sat_area_ratio(loc_map: torch.Tensor) -> torch.Tensor:
    """Per-image foreground ratio: the mean of the map, shape (B,) (the official ``phase='train'`` 2nd output)."""
    return _as_bhw(loc_map).mean(dim=(1, 2))


def sat_norm_term(loc_map: torch.Tensor, kernel: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-image mean of ``M~ (1 - M~)`` on the Gaussian-filtered map, shape (B,) (official 3rd output).

    Args:
        loc_map: (B, h, w) or (B, 1, h, w) map.
        kernel: (1, 1, k, k) filter (default: the official 3x3 Gaussian).
    """
    m = gaussian_filter_map(_as_bhw(loc_map), kernel)
    return (m * (1 - m)).mean(dim=(1, 2))


def sat_area_loss(loc_map: torch.Tensor, area_thr: float = 0.25) -> torch.Tensor:
    """Batch area loss ``|mean over the batch of the foreground ratio - area_thr|`` (a scalar)."""
    return (sat_area_ratio(loc_map).mean() - area_thr).abs()


def sat_norm_loss(loc_map: torch.Tensor, kernel: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Normalization loss: batch mean of ``M~ (1 - M~)`` on the Gaussian-filtered map (a scalar); pushes M~ to 0 / 1."""
    return sat_norm_term(loc_map, kernel).mean()


class SATLoss(nn.Module):
    """Cross-entropy + batch area loss + normalization loss.

    Call it on the output of ``model.forward_loc(x)``::

        criterion = SATLoss(area_thr=0.25)
        loss = criterion(model.forward_loc(x), target)

    Args:
        area_thr: Target foreground ratio of the batch (CUB 0.25, ImageNet 0.35).
        area_weight: Weight of the area loss.
        norm_weight: Weight of the normalization loss.
        cls_weight: Weight of the classification loss.
        cls_loss: Classification criterion (default plain ``F.cross_entropy``, as the original: no smoothing / mixup);
            any ``loss(logits, target)``, e.g. timm's ``SoftTargetCrossEntropy`` with mixup targets.
        kernel_size: Gaussian filter size (official 3).
        nsig: Gaussian range in standard deviations (official 6).
    """

    def __init__(
            self,
            area_thr: float = 0.25,
            area_weight: float = 1.0,
            norm_weight: float = 1.0,
            cls_weight: float = 1.0,
            cls_loss: Optional[nn.Module] = None,
            kernel_size: int = 3,
            nsig: float = 6.0,
    ):
        super().__init__()
        if not 0.0 <= area_thr <= 1.0:
            raise ValueError(f'area_thr must be in [0, 1], got {area_thr}')
        self.area_thr = area_thr
        self.area_weight = area_weight
        self.norm_weight = norm_weight
        self.cls_weight = cls_weight
        self.cls_loss = cls_loss
        self.register_buffer('kernel', gaussian_kernel(kernel_size, nsig), persistent=False)

    def forward(
            self,
            output: Tuple[torch.Tensor, torch.Tensor],
            target: torch.Tensor,
            return_terms: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
        """Total loss of ``output = (logits, loc_map)``; with ``return_terms`` also ``{'cls', 'area', 'norm'}``."""
        if not isinstance(output, (tuple, list)) or len(output) < 2:
            raise TypeError('SATLoss expects the (logits, loc_map) output of model.forward_loc(x)')
        logits, loc_map = output[0], output[1]
        cls = self.cls_loss(logits, target) if self.cls_loss is not None else F.cross_entropy(logits, target)
        area = sat_area_loss(loc_map, self.area_thr)
        norm = sat_norm_loss(loc_map, self.kernel)
        total = self.cls_weight * cls + self.area_weight * area + self.norm_weight * norm
        if return_terms:
            return total, {'cls': cls.detach(), 'area': area.detach(), 'norm': norm.detach()}
        return total

    def extra_repr(self) -> str:
        return (f'area_thr={self.area_thr}, area_weight={self.area_weight}, norm_weight={self.norm_weight}, '
                f'cls_weight={self.cls_weight}')
