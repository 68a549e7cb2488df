"""A convolution followed by global average pooling, without the convolution's output map.

Averaging is linear, so the mean over positions of ``conv2d(x, W, b)`` (stride 1, zero padding) is

    mean_p conv(x)[o, p] = sum_{c,u,v} W[o, c, u, v] * S[c, u, v] / (H_out * W_out) + b[o]

where ``S[c, u, v]`` sums ``x[c]`` over the rows / columns that kernel offset (u, v) reaches, i.e.
``S = A_h x A_w^T`` with 0/1 band matrices. The class-map head of SAT (a 3x3 conv to the classes, then the mean) costs
``classes x C x 9`` MACs per position that way instead of per image: for DeiT-T at 224 with 1000 classes, 2.7 GMACs of
a batch of 8 become 14 MMACs, in the backward too.

This module imports only torch.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['conv2d_mean']


def _band(size: int, kernel: int, pad: int, like: torch.Tensor) -> torch.Tensor:
    # (kernel, size): row u marks the input positions kernel offset u reaches over all output positions
    out = size + 2 * pad - kernel + 1
    pos = torch.arange(size, device=like.device)
    start = torch.arange(kernel, device=like.device)[:, None] - pad
    return ((pos >= start) & (pos < start + out)).to(like.dtype)


def conv2d_mean(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        padding: Tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=padding).mean(dim=(2, 3))`` (stride 1, no dilation, one group).

    Equal up to summation order (~1e-7 relative in fp32); gradients flow to ``x``, ``weight`` and ``bias``.

    Args:
        x: (B, C, H, W) input.
        weight: (O, C, kh, kw) kernel.
        bias: (O,) or None.
        padding: Zero padding (ph, pw).

    Returns:
        (B, O) pooled outputs.
    """
    B, C, H, W = x.shape
    O, Cw, kh, kw = weight.shape
    ph, pw = padding
    h_out, w_out = H + 2 * ph - kh + 1, W + 2 * pw - kw + 1
    if Cw != C or h_out < 1 or w_out < 1:
        raise ValueError(f'conv2d_mean: input {tuple(x.shape)} does not fit kernel {tuple(weight.shape)} with padding '
                         f'{tuple(padding)}')
    # S (B, C, kh, kw): window sums, already divided by the number of output positions
    s = _band(H, kh, ph, x) @ x @ _band(W, kw, pw, x).transpose(0, 1).div(h_out * w_out)
    return F.linear(s.reshape(B, C * kh * kw), weight.reshape(O, C * kh * kw), bias)
