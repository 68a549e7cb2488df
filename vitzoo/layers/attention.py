"""The multi-head attention set-up shared by vitzoo's softmax attentions (torch only).

:class:`MultiHeadAttention` builds what every one of them has (head check, ``head_dim``, ``scale``, the ``qkv`` or
``q`` / ``kv`` projections, ``attn_drop``, ``proj``, ``proj_drop``, in that order: the parameter names and the order
of the random init draws of timm's ``Attention``) and the steps they share: splitting the projections into heads,
the fused (SDPA) call, the scaled logits of the explicit path and the output projection. Each subclass writes only
its own ``forward`` (masks, gates, spatial reduction, side outputs).
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .linear import Linear

__all__ = ['MultiHeadAttention']


class MultiHeadAttention(nn.Module):
    """Multi-head attention projections and steps; subclasses implement ``forward``.

    Args:
        dim: Token width.
        num_heads: Heads (must divide ``dim``).
        qkv_bias: Bias in the input projections.
        attn_drop: Attention dropout.
        proj_drop: Dropout after the output projection.
        fused_attn: Attend with ``F.scaled_dot_product_attention`` where the subclass allows it.
        separate_q: ``q`` (dim -> dim) and ``kv`` (dim -> 2 dim) projections instead of one ``qkv`` (dim -> 3 dim),
            for keys / values from other tokens than the queries.
    """

    error_prefix: str = ''  # start of the head-check message (e.g. the class name)

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            fused_attn: bool = True,
            separate_q: bool = False,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'{self.error_prefix}dim {dim} must be divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused_attn
        if separate_q:
            self.q = Linear(dim, dim, bias=qkv_bias)
            self.kv = Linear(dim, dim * 2, bias=qkv_bias)
        else:
            self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _split_qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, C) tokens -> q, k, v of shape (B, heads, N, head_dim) through ``qkv``."""
        B, N, _ = x.shape
        return self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _split_q(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens -> q (B, heads, N, head_dim) through ``q``."""
        B, N, _ = x.shape
        return self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def _split_kv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, M, C) tokens -> k, v (B, heads, M, head_dim) through ``kv`` (its channels: k first, then v)."""
        B = x.shape[0]
        return self.kv(x).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _sdpa(
            self,
            q: torch.Tensor,
            k: torch.Tensor,
            v: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Fused attention, with ``attn_drop``'s rate in training."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.)

    def _logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Attention logits of the explicit path, scaled after the product (the official order)."""
        return (q @ k.transpose(-2, -1)) * self.scale

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, head_dim) attention output -> (B, N, C) through ``proj`` and ``proj_drop``."""
        B, _, N, _ = x.shape
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))
