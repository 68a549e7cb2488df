"""Token-aware average pooling (TAP) of "Robustifying Token Attention for Vision Transformers".

Guo, Stutz, Schiele, ICCV 2023 - https://arxiv.org/abs/2303.11126
Official code: https://github.com/guoyongcs/TAPADL (``DilatedAvgPooling`` / ``DilationPredictor`` in
``TAPADL_FAN/models/convnext_utils.py`` and ``TAPADL_RVT/tap_robust_models.py``).

TAP mixes every token with a learned, per-token soft choice of dilated 3x3 average pools before the attention branch:
``pooled = sum_k w_k * pool_k(x)``, with ``w = softmax_k(conv3x3(BN(conv3x3(x))))`` predicted from the raw tokens
(before ``norm1``). Scale ``k`` is a 3x3 mean with dilation ``k`` (``k = 0`` is the identity) and zero padding that
always divides by 9, as the original does, so border tokens lose magnitude. The attention branch reads the pooled
tokens; the block's residual keeps the unpooled ones.

Beyond the original: any token grid, square or not (the original reshapes with ``int(N ** 0.5)``); the pools are
depthwise convolutions with constant 1/9 weights instead of ``nn.Unfold`` + mean (no 9x copy of the features).
Torch only.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['dilated_avg_pool', 'DilatedAvgPooling', 'DilationPredictor', 'token_aware_pool', 'TokenPoolingMixin',
           'TokenAwarePooling']


def dilated_avg_pool(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """3x3 average with dilation ``d`` and zero padding ``d`` (stride 1), always divided by 9.

    Equals a depthwise 3x3 convolution with weights 1/9; ``dilation == 0`` is the identity.

    Args:
        x: (B, C, H, W) features.
        dilation: 0 (identity) or the tap spacing d >= 1.
    """
    if dilation == 0:
        return x
    if dilation < 0:
        raise ValueError(f'dilation must be >= 0, got {dilation}')
    C = x.shape[1]
    # a depthwise convolution with constant 1/9 weights: faster than nn.Unfold (no 9x copy) or shifted-slice sums
    weight = x.new_full((C, 1, 3, 3), 1.0 / 9.0)
    return F.conv2d(x, weight, padding=dilation, dilation=dilation, groups=C)


class DilatedAvgPooling(nn.Module):
    """Module form of :func:`dilated_avg_pool` (no parameters): (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dilation: int = 0):
        super().__init__()
        if dilation < 0:
            raise ValueError(f'dilation must be >= 0, got {dilation}')
        self.dilation = dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dilated_avg_pool(x, self.dilation)

    def extra_repr(self) -> str:
        return f'dilation={self.dilation}'


class DilationPredictor(nn.Module):
    """Per-token soft weights over the pooling scales: conv3x3 -> BN -> conv3x3 (no activation), softmax over scales.

    State-dict keys ``proj.0.weight``, ``proj.1.*`` (BatchNorm, with running stats), ``proj.2.weight`` as the original.

    Args:
        dim: Input channels.
        num_scales: Number of scales K.
        temperature: Softmax temperature (the original uses 1).
    """

    def __init__(self, dim: int, num_scales: int, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature
        self.proj = nn.Sequential(
            nn.Conv2d(dim, num_scales, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(num_scales),
            nn.Conv2d(num_scales, num_scales, kernel_size=3, stride=1, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, K, H, W) weights that sum to 1 over K (the original returns them as (B, 1, H, W, K))."""
        x = self.proj(x)
        if self.temperature != 1:
            x = x / self.temperature
        return x.softmax(dim=1)


def token_aware_pool(
        x: torch.Tensor,
        hw: Tuple[int, int],
        predictor: nn.Module,
        dilations: Sequence[int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Apply TAP to a token sequence.

    Args:
        x: (B, N, C) tokens of an H x W grid in raster order (no prefix tokens).
        hw: The grid (H, W); any shape.
        predictor: A :class:`DilationPredictor` with ``len(dilations)`` scales.
        dilations: The dilation of each scale (the original: 0, 1, ..., K - 1).

    Returns:
        The pooled tokens (B, N, C) and the scale weights (B, K, H, W).
    """
    B, N, C = x.shape
    H, W = hw
    if N != H * W:
        raise ValueError(f'token_aware_pool: {N} tokens do not form the {H}x{W} grid')
    grid = x.transpose(1, 2).reshape(B, C, H, W)
    weights = predictor(grid)
    out = None
    for k, d in enumerate(dilations):
        term = dilated_avg_pool(grid, d) * weights[:, k:k + 1]
        out = term if out is None else out + term
    return out.flatten(2).transpose(1, 2), weights


class TokenPoolingMixin:
    """TAP wiring for a module that pools its own tokens: ``token_pools`` / ``dilation_predictor`` children, the scale
    weights of the last call in ``pred_scale``.

    The TAP-FAN / TAP-RVT blocks mix this in so their TAP keys stay the official ones
    (``blocks.{i}.dilation_predictor.*``, next to the block's attention); :class:`TokenAwarePooling` is the same
    wiring as a standalone module.
    """

    def init_token_pooling(self, dim: int, num_scales: int, temperature: float = 1.0) -> None:
        """Create the TAP children (dilations 0 .. K-1); ``num_scales=0`` creates none (TAP off, no keys).

        Args:
            dim: Token channels.
            num_scales: Number of scales K (0: off).
            temperature: Softmax temperature of the predictor.
        """
        if num_scales < 0:
            raise ValueError(f'num_scales must be >= 0, got {num_scales}')
        self.num_scales = num_scales
        if num_scales > 0:
            self.token_pools = nn.ModuleList([DilatedAvgPooling(i) for i in range(num_scales)])
            self.dilation_predictor = DilationPredictor(dim, num_scales, temperature)
        self.pred_scale: Optional[torch.Tensor] = None

    def token_pool(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """TAP of (B, N, C) tokens of the ``hw`` grid (``x`` itself when TAP is off)."""
        if self.num_scales == 0:
            return x
        x, w = token_aware_pool(x, hw, self.dilation_predictor, [p.dilation for p in self.token_pools])
        self.pred_scale = w.detach()  # for visualisation, like the original (which keeps it as (B, 1, H, W, K))
        return x


class TokenAwarePooling(TokenPoolingMixin, nn.Module):
    """TAP as a standalone module: (B, N, C) tokens of an H x W grid -> pooled (B, N, C) tokens.

    The vitzoo TAP blocks hold ``token_pools`` / ``dilation_predictor`` themselves (the official state-dict keys)
    through :class:`TokenPoolingMixin`; this module is the same computation for use in other networks.

    Args:
        dim: Token channels.
        num_scales: Number of scales K (dilations 0 .. K-1; the released models use 4).
        temperature: Softmax temperature of the predictor.
    """

    def __init__(self, dim: int, num_scales: int = 4, temperature: float = 1.0):
        super().__init__()
        if num_scales < 1:
            raise ValueError(f'num_scales must be >= 1, got {num_scales}')
        self.init_token_pooling(dim, num_scales, temperature)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        return self.token_pool(x, hw)
