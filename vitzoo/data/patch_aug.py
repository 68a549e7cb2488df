"""Patch-wise augmentation of the TAP-ADL RVT recipe (``--use_patch_aug`` of guoyongcs/TAPADL).

The official training step (``TAPADL_RVT/engine.py``, ``train_one_epoch`` and ``patch_level_aug``) cuts every
(mixed-up, normalised) image into non-overlapping ``ps x ps`` patches, treats the patches as one batch for three kornia
augmentations and folds them back::

    nn.Sequential(K.augmentation.RandomResizedCrop(size=(ps, ps), scale=(0.85, 1.0), ratio=(1.0, 1.0), p=0.1),
                  K.augmentation.RandomGaussianNoise(mean=0., std=0.01, p=0.1),
                  K.augmentation.RandomHorizontalFlip(p=0.1))

then clamps the result to the normalised limits of [0, 1] pixels, ``((0 - mean) / std, (1 - mean) / std)``. The
training step trains on the augmented batch as well (a second forward / backward; ``tools/train.py --patch-aug``).

What the official kornia (0.6.11, ``requirements.txt``) does with these settings, reproduced here:

- ``RandomResizedCrop``'s ``p`` is kornia's *batch* probability (it passes ``p_batch=p`` and ``p=1``): in one call in
  ten *every* patch is crop-resized, each with its own crop, otherwise none is. The crop side is
  ``round(sqrt(scale * ps * ps))`` for ten draws of ``scale`` in [0.85, 1.0], of which 0.6.11 takes the first that is
  strictly smaller than the patch (a full-size draw is rejected; if all ten are, the whole patch is kept), at a
  uniformly random integer offset, resized back with bilinear interpolation, ``align_corners=True``. Current kornia
  (0.9) also accepts the full-size draw, which leaves ~40 % of the "cropped" 16 x 16 patches unchanged; this module
  draws the crops with the 0.6.11 rule and crops / resizes them with kornia's ``resize``, grouped by crop size (the
  same values as kornia's per-patch ``crop_by_indices`` loop, without a Python loop over 12,544 patches).
- ``RandomGaussianNoise`` and ``RandomHorizontalFlip``: per patch with probability ``p`` (kornia's element
  probability); the kornia modules themselves are used.

Deliberate difference: the patch size is the model's (:func:`model_patch_size`), where the official code hard-codes
16 for 224-pixel and 4 for 32-pixel inputs and fails at any other size.

Random numbers come from torch's global (CPU) generator, as kornia's do: a seed makes the augmentation repeatable.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = ['PatchResizedCrop', 'PatchLevelAug', 'patch_level_aug', 'model_patch_size', 'to_patches', 'from_patches']


def _kornia():
    try:
        import kornia
    except ImportError as e:  # kornia is in the [robust] extra
        raise ImportError("the patch-wise augmentation needs kornia: pip install 'vitzoo[robust]' (or kornia)") from e
    return kornia


def to_patches(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B * H/ps * W/ps, C, ps, ps)``, patches in row-major order per image (the official
    ``unfold`` layout)."""
    B, C, H, W = x.shape
    ps = patch_size
    if H % ps or W % ps:
        raise ValueError(f'patch-wise augmentation: the input {H}x{W} is not a multiple of the patch size {ps}')
    return x.reshape(B, C, H // ps, ps, W // ps, ps).permute(0, 2, 4, 1, 3, 5).reshape(-1, C, ps, ps)


def from_patches(patches: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`to_patches` (the official ``F.fold`` of non-overlapping patches)."""
    _, C, ps, _ = patches.shape
    return patches.reshape(batch, height // ps, width // ps, C, ps, ps).permute(0, 3, 1, 4, 2, 5).reshape(
        batch, C, height, width)


class PatchResizedCrop(nn.Module):
    """kornia 0.6.11's ``RandomResizedCrop(size=(h, w), scale, ratio, p)`` on a batch of patches.

    With probability ``p`` per call (kornia's batch probability) every patch is replaced by a random crop of it,
    resized back to its size; otherwise the batch is returned as it is.

    Args:
        scale: Range of the crop area as a fraction of the patch area.
        ratio: Range of the crop aspect ratio (width / height).
        p: Probability that a call crops the batch.
    """

    def __init__(self, scale: Sequence[float] = (0.85, 1.0), ratio: Sequence[float] = (1.0, 1.0), p: float = 0.1):
        super().__init__()
        if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]) or not 0 <= p <= 1:
            raise ValueError(f'PatchResizedCrop: need 0 < scale[0] <= scale[1], 0 < ratio[0] <= ratio[1] and '
                             f'0 <= p <= 1, got scale {tuple(scale)}, ratio {tuple(ratio)}, p {p}')
        self.scale, self.ratio, self.p = tuple(scale), tuple(ratio), float(p)

    def sample(self, n: int, height: int, width: int) -> torch.Tensor:
        """Crop boxes ``(n, 4)`` int64 ``[y0, x0, h, w]`` of ``height x width`` patches (kornia 0.6.11's rule)."""
        rand = torch.rand(n, 10)
        area = (rand * (self.scale[1] - self.scale[0]) + self.scale[0]) * height * width
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(torch.rand(n, 10) * (hi - lo) + lo)
        w = torch.sqrt(area * aspect).round()
        h = torch.sqrt(area / aspect).round()
        # 0.6.11 keeps only crops strictly inside the patch (kornia 0.9 also takes the full-size one)
        ok = (w > 0) & (w < width) & (h > 0) & (h < height)
        first = ok.int().argmax(1, keepdim=True)  # the first draw that fits
        found = ok.any(1)
        h = torch.where(found, h.gather(1, first)[:, 0], torch.tensor(float(height))).long()
        w = torch.where(found, w.gather(1, first)[:, 0], torch.tensor(float(width))).long()
        x0 = (torch.rand(n) * (width - w + 1)).floor().long()
        y0 = (torch.rand(n) * (height - h + 1)).floor().long()
        return torch.stack([y0, x0, h, w], 1)

    @staticmethod
    def crop_resize(patches: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Crop ``boxes`` (``[y0, x0, h, w]`` per patch) and resize each crop back to the patch size with kornia's
        bilinear ``resize`` (``align_corners=True``), as kornia's ``crop_by_indices`` does patch by patch."""
        resize = _kornia().geometry.transform.resize
        n, _, height, width = patches.shape
        out = patches.clone()
        sizes = boxes[:, 2:]
        for hw in torch.unique(sizes, dim=0).tolist():
            idx = torch.nonzero((sizes == torch.tensor(hw)).all(1))[:, 0]
            if hw == [height, width]:
                continue  # a whole-patch crop is the patch
            rows = (boxes[idx, 0:1] + torch.arange(hw[0])).to(patches.device)  # (k, h)
            cols = (boxes[idx, 1:2] + torch.arange(hw[1])).to(patches.device)  # (k, w)
            sel = idx.to(patches.device)[:, None, None]
            crops = patches[sel, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (k, C, h, w)
            out[idx.to(patches.device)] = resize(crops, (height, width), interpolation='bilinear',
                                                 align_corners=True)
        return out

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if self.p == 0 or torch.rand(1).item() >= self.p:
            return patches
        return self.crop_resize(patches, self.sample(patches.shape[0], patches.shape[-2], patches.shape[-1]))

    def extra_repr(self) -> str:
        return f'scale={self.scale}, ratio={self.ratio}, p={self.p}'


class PatchLevelAug(nn.Module):
    """TAP-ADL's patch-wise augmentation of a normalised image batch (the official defaults).

    Args:
        patch_size: Side of the square patches (the model's patch size, :func:`model_patch_size`).
        mean: Normalisation mean of the images (the clamp limits are those of [0, 1] pixels).
        std: Normalisation std.
        crop_scale: Crop area range of the per-patch random-resized crop.
        crop_ratio: Crop aspect-ratio range.
        crop_p: Probability that a call crops every patch (kornia's batch probability).
        noise_std: Std of the additive Gaussian noise.
        noise_p: Probability per patch of the noise.
        flip_p: Probability per patch of a horizontal flip.

    Example::

        aug = PatchLevelAug(16).to(x.device)
        x_aug = aug(x)  # (B, 3, 224, 224) normalised images -> same shape, ~10 % of the patches changed per op
    """

    def __init__(self, patch_size: int, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, crop_scale: Sequence[float] = (0.85, 1.0),
                 crop_ratio: Sequence[float] = (1.0, 1.0), crop_p: float = 0.1, noise_std: float = 0.01,
                 noise_p: float = 0.1, flip_p: float = 0.1):
        super().__init__()
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f'PatchLevelAug: patch_size must be a positive int, got {patch_size!r}')
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f'PatchLevelAug: mean {tuple(mean)} and std {tuple(std)} need one entry per channel '
                             'and std > 0')
        K = _kornia()
        self.patch_size = patch_size
        self.transform = nn.Sequential(
            PatchResizedCrop(crop_scale, crop_ratio, p=crop_p),
            K.augmentation.RandomGaussianNoise(mean=0., std=noise_std, p=noise_p),
            K.augmentation.RandomHorizontalFlip(p=flip_p),
        )
        mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.register_buffer('lower', (0 - mean_t) / std_t, persistent=False)
        self.register_buffer('upper', (1 - mean_t) / std_t, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.lower.shape[0]:
            raise ValueError(f'PatchLevelAug: expected (B, {self.lower.shape[0]}, H, W) images, got {tuple(x.shape)}')
        B, _, H, W = x.shape
        patches = self.transform(to_patches(x, self.patch_size))
        out = from_patches(patches, B, H, W)
        # the whole image is clamped (official clamp()), untouched patches included
        return torch.max(torch.min(out, self.upper.to(out)), self.lower.to(out))

    def extra_repr(self) -> str:
        return f'patch_size={self.patch_size}'


def patch_level_aug(x: torch.Tensor, patch_size: int, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                    std: Sequence[float] = IMAGENET_DEFAULT_STD, **kwargs) -> torch.Tensor:
    """Functional :class:`PatchLevelAug`: ``x`` (normalised ``(B, C, H, W)``) patch-augmented, same shape."""
    return PatchLevelAug(patch_size, mean, std, **kwargs).to(x.device)(x)


def model_patch_size(model: nn.Module) -> int:
    """The patch size (token stride of the stem) of a vitzoo / timm model, for :class:`PatchLevelAug`.

    Looks at ``model.patch_size``, ``model.patch_embed.patch_size`` and ``model.patch_embed.reduction`` (RVT's conv
    stem); raises ``ValueError`` for a model that has none of them or non-square patches.
    """
    embed = getattr(model, 'patch_embed', None)
    for value in (getattr(model, 'patch_size', None), getattr(embed, 'patch_size', None),
                  getattr(embed, 'reduction', None)):
        if value is None:
            continue
        size: Union[int, Tuple[int, ...]] = tuple(value) if isinstance(value, (tuple, list)) else int(value)
        if isinstance(size, tuple):
            if len(set(size)) != 1:
                raise ValueError(f'{type(model).__name__} has non-square patches {size}: the patch-wise '
                                 'augmentation needs square ones')
            size = int(size[0])
        return size
    raise ValueError(f'{type(model).__name__} has no patch size (patch_size / patch_embed.patch_size / '
                     'patch_embed.reduction): the patch-wise augmentation cuts images into the model\'s patches')
