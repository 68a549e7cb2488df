"""Window geometry shared by the windowed attentions (Swin's shifted windows, CSwin's stripes).

Maps are (B, H, W, C). A map is zero-padded bottom/right to a multiple of the window, optionally rolled (Swin's cyclic
shift), cut into row-major windows, attended, and put back; the padded positions are masked out of the keys so that
results do not depend on the padding.

This module imports only torch.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['window_partition', 'window_reverse', 'window_padding', 'pad_to_windows', 'padded_key_mask']


def window_partition(x: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, wh * ww, C), windows row-major; H and W must be multiples of the window."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.reshape(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // wh) * (W // ww), wh * ww, C)


def window_reverse(windows: torch.Tensor, window: Tuple[int, int], hw: Tuple[int, int]) -> torch.Tensor:
    """(B, nW, wh * ww, C), or (B * nW, wh * ww, C), -> (B, H, W, C): the inverse of :func:`window_partition`."""
    C = windows.shape[-1]
    (wh, ww), (H, W) = window, hw
    x = windows.reshape(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def window_padding(hw: Tuple[int, int], window: Tuple[int, int]) -> Tuple[int, int]:
    """Bottom / right zero padding (ph, pw) that makes an (H, W) map a multiple of the window."""
    return (-hw[0]) % window[0], (-hw[1]) % window[1]


def pad_to_windows(x: torch.Tensor, window: Tuple[int, int]) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Zero-pad a (B, H, W, C) map bottom/right to a multiple of the window; returns it and the padding (ph, pw)."""
    ph, pw = window_padding(x.shape[1:3], window)
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    return x, (ph, pw)


def padded_key_mask(
        hw: Tuple[int, int],
        window: Tuple[int, int],
        shift: Tuple[int, int] = (0, 0),
        device: Optional[torch.device] = None,
) -> torch.Tensor:
    """(nW, wh * ww) bool, True at the zero-padded positions of each window.

    Args:
        hw: The unpadded map (H, W).
        window: Window (wh, ww); the map is padded to multiples of it.
        shift: Cyclic shift (sh, sw) applied to the padded map before partitioning (Swin).
        device: Where to build the mask.
    """
    (H, W), (ph, pw) = hw, window_padding(hw, window)
    pad = torch.zeros(1, H + ph, W + pw, 1, dtype=torch.bool, device=device)
    pad[:, H:] = True
    pad[:, :, W:] = True
    if shift[0] or shift[1]:
        pad = torch.roll(pad, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    return window_partition(pad, window)[0, ..., 0]
