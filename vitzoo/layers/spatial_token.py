"""Spatial-aware token attention (SAT)

Spatial-Aware Token for Weakly Supervised Object Localization (Wu et al., ICCV 2023)
    - https://arxiv.org/abs/2303.10438
Official code: https://github.com/wpy1999/SAT (``Model/SAT.py``).

A learnable spatial token is appended **last** to the token sequence. In every block its query row of attention logits,
averaged over heads and passed through a sigmoid, is a foreground mask over all keys:

    m_j = sigmoid(mean_h(q_loc,h . k_j,h * scale))            (B, N)

In the spatial-aware blocks (the last 3 of 12 in the released models) the softmaxed attention is multiplied by that mask
column-wise, with no renormalisation, exactly as the original: ``attn[b, h, i, j] *= m[b, j]``. Since that equals
``softmax(logits) @ (m * v)``, the fused path runs ``F.scaled_dot_product_attention`` on mask-scaled values and only
computes the spatial token's logit row explicitly.

The localization map is the mean of the per-block masks of the spatial-aware blocks over the patch keys
(:func:`fuse_spatial_masks`); the training losses filter it with a fixed 3x3 Gaussian (:func:`gaussian_kernel`,
:func:`gaussian_filter_map`). Everything here works at any token-grid size.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .attention import MultiHeadAttention
from .sdpa import use_sdpa

__all__ = ['SpatialTokenAttention', 'spatial_mask_from_logits', 'fuse_spatial_masks', 'gaussian_kernel',
           'gaussian_filter_map']


def spatial_mask_from_logits(token_logits: torch.Tensor) -> torch.Tensor:
    """Foreground mask from the spatial token's query row of attention logits.

    Args:
        token_logits: (B, heads, N) pre-softmax logits ``q_loc . k_j * scale``.

    Returns:
        (B, N) mask in (0, 1): sigmoid of the head-averaged logits (averaged before the sigmoid, as the original).
    """
    return token_logits.mean(dim=1).sigmoid()


class SpatialTokenAttention(MultiHeadAttention):
    """Multi-head self-attention that also yields the spatial token's foreground mask.

    The spatial token is the last token of the sequence (``token_index=-1``). With ``spatial_aware=True`` the softmaxed
    attention of every query is multiplied by the mask over the keys (no renormalisation); otherwise the attention is
    plain softmax attention and the mask is only computed when asked for.

    Args:
        dim: Token width.
        num_heads: Heads.
        qkv_bias: Bias in the qkv projection.
        attn_drop: Attention dropout.
        proj_drop: Dropout after the output projection.
        spatial_aware: Gate the attention by the spatial mask.
        fused_attn: Use ``F.scaled_dot_product_attention`` (False: materialise the attention matrix).
        token_index: Position of the spatial token in the sequence.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = True,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            spatial_aware: bool = False,
            fused_attn: bool = True,
            token_index: int = -1,
    ):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
                         fused_attn=fused_attn)
        self.spatial_aware = spatial_aware
        self.token_index = token_index

    def forward(self, x: torch.Tensor, need_mask: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Attend.

        Args:
            x: (B, N, C) tokens, the spatial token at ``token_index``.
            need_mask: Return the mask even when the block is not spatial-aware.

        Returns:
            ``(out, mask)``: (B, N, C) output and the (B, N) spatial mask over all keys (None when not computed).
        """
        N = x.shape[1]
        q, k, v = self._split_qkv(x)
        want_mask = need_mask or self.spatial_aware
        mask = None
        if self.fused_attn and use_sdpa(q, k, v):
            if want_mask:
                q_tok = q.narrow(2, self.token_index % N, 1)  # only the spatial token's logit row is needed
                mask = spatial_mask_from_logits(self._logits(q_tok, k).squeeze(2))
            if self.spatial_aware:
                # (softmax(l) * m_j) @ v == softmax(l) @ (m_j * v_j): gate the values, keep the fused kernel
                v = v * mask[:, None, :, None]
            x = self._sdpa(q, k, v)
        else:
            attn = self._logits(q, k)  # scale after the product, as the original
            if want_mask:
                mask = spatial_mask_from_logits(attn[:, :, self.token_index])
            attn = attn.softmax(dim=-1)
            if self.spatial_aware:
                attn = attn * mask[:, None, None, :]  # no renormalisation (faithful)
            attn = self.attn_drop(attn)
            x = attn @ v
        return self._project(x), mask


def fuse_spatial_masks(
        masks: Sequence[torch.Tensor],
        grid_size: Tuple[int, int],
        num_prefix_tokens: int = 1,
        num_suffix_tokens: int = 1,
) -> torch.Tensor:
    """The localization map: mean of per-block masks over the patch keys.

    Args:
        masks: (B, N) masks of the blocks to fuse (the released models: blocks 9-11).
        grid_size: Token grid (h, w) of the patches.
        num_prefix_tokens: Tokens before the patches (class token).
        num_suffix_tokens: Tokens after the patches (spatial token).

    Returns:
        (B, h, w) map in (0, 1).
    """
    if not masks:
        raise ValueError('fuse_spatial_masks needs at least one mask')
    h, w = grid_size
    N = masks[0].shape[-1]
    end = N - num_suffix_tokens
    if end - num_prefix_tokens != h * w:
        raise ValueError(f'masks have {end - num_prefix_tokens} patch tokens, grid {h}x{w} needs {h * w}')
    m = torch.stack([mk[:, num_prefix_tokens:end] for mk in masks], dim=0).mean(dim=0)
    return m.reshape(m.shape[0], h, w)


def gaussian_kernel(
        kernel_size: int = 3,
        nsig: float = 6.0,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
) -> torch.Tensor:
    """The fixed Gaussian of SAT's normalization loss (official ``get_kernel(3, 6)``), as a (1, 1, k, k) tensor.

    The 1-D weights are normal-CDF differences over ``kernel_size`` equal bins spanning ``[-nsig - d/2, nsig + d/2]``
    (``d = (2 nsig + 1) / kernel_size``); the 2-D kernel is ``sqrt(outer(w, w))`` normalised to sum 1. For (3, 6) it is
    about [[.0026, .0460, .0026], [.0460, .8054, .0460], [.0026, .0460, .0026]].
    """
    interval = (2 * nsig + 1.0) / kernel_size
    edges = torch.linspace(-nsig - interval / 2.0, nsig + interval / 2.0, kernel_size + 1, dtype=torch.float64)
    w1 = torch.special.ndtr(edges).diff()
    k = torch.sqrt(torch.outer(w1, w1))
    k = k / k.sum()
    return k.to(dtype=dtype, device=device).reshape(1, 1, kernel_size, kernel_size)


def gaussian_filter_map(loc_map: torch.Tensor, kernel: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Filter a localization map with the (zero-padded) Gaussian, as SAT's normalization loss does.

    Args:
        loc_map: (B, h, w) or (B, 1, h, w) map.
        kernel: (1, 1, k, k) kernel (default :func:`gaussian_kernel`).

    Returns:
        The filtered map, same shape as ``loc_map``.
    """
    if kernel is None:
        kernel = gaussian_kernel(dtype=loc_map.dtype, device=loc_map.device)
    kernel = kernel.to(dtype=loc_map.dtype, device=loc_map.device)
    squeeze = loc_map.dim() == 3
    m = loc_map.unsqueeze(1) if squeeze else loc_map
    out = F.conv2d(m, kernel, padding=kernel.shape[-1] // 2)
    return out.squeeze(1) if squeeze else out
