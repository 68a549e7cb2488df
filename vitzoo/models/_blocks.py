"""Transformer blocks shared by vitzoo model families (DeiT families, Agent-PVT, Agent-Swin)."""
from typing import Any, Callable, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath

from ._helpers import Mlp

__all__ = ['PreNormBlock']


class PreNormBlock(nn.Module):
    """The pre-norm transformer block around a family's attention (timm / DeiT parameter names).

    ``x + drop_path1(attn(norm1(x), *args))``, then ``x + drop_path2(mlp(norm2(x)))``. An attention that returns
    ``(out, aux)`` makes the block return ``(x, aux)``.

    Args:
        dim: Width.
        num_heads: Heads.
        attn_layer: Attention class, called as ``attn_layer(dim, num_heads=, qkv_bias=, attn_drop=, proj_drop=,
            **attn_kwargs)``.
        mlp_ratio: MLP expansion.
        qkv_bias: Bias in qkv.
        proj_drop: Dropout after the projections / MLP.
        attn_drop: Attention dropout.
        drop_path: Stochastic depth rate.
        act_layer: MLP activation.
        norm_layer: Norm.
        mlp_layer: MLP class, called as ``mlp_layer(dim, hidden, act_layer=, drop=)``.
        attn_kwargs: The attention's own arguments.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            attn_layer: Callable[..., nn.Module],
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
            drop_path: float = 0.0,
            act_layer: Callable = nn.GELU,
            norm_layer: Callable = nn.LayerNorm,
            mlp_layer: Callable[..., nn.Module] = Mlp,
            **attn_kwargs: Any,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **attn_kwargs)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, *args: Any) -> Union[torch.Tensor, Tuple[torch.Tensor, Any]]:
        y = self.attn(self.norm1(x), *args)
        if isinstance(y, tuple):
            y, aux = y
            return self._mlp_residual(x + self.drop_path1(y)), aux
        return self._mlp_residual(x + self.drop_path1(y))

    def _mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path2(self.mlp(self.norm2(x)))
