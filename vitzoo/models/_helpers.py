"""Checkpoint helpers and small layers shared by the vitzoo model files."""
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp as _TimmMlp
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = ['CheckpointError', 'unwrap_state_dict', 'check_state_dict', 'embed_patches', 'sizes_match', 'Mlp']


def sizes_match(a: Tuple[int, ...], b: Tuple[int, ...]) -> bool:
    """``tuple(a) == tuple(b)`` for sizes; False without a guard when tracing with symbolic sizes.

    Models skip a resize (of a position table or bias) when the token grid equals the trained one. Under
    dynamic-shape ``torch.compile`` / ``torch.export`` that comparison would install a guard specialising the graph
    to the example size; a symbolic size takes the resize instead, which is exact at an equal size.
    """
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: names the key, the checkpoint shape and the expected shape."""


def unwrap_state_dict(checkpoint: Dict, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Return the tensor dict of an official/training checkpoint, without DDP ``module.`` prefixes.

    Accepts a plain state_dict or one nested under ``model`` / ``state_dict`` / ``model_ema`` / ``state_dict_ema``
    (the official Agent-Attention checkpoints use ``{'model': ...}``, CSwin EMA ones add ``state_dict_ema``).

    Args:
        checkpoint: What ``torch.load`` returned.
        use_ema: Prefer the EMA weights when both are present.
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'expected a dict checkpoint, got {type(checkpoint).__name__}')
    order = ('state_dict_ema', 'model_ema', 'model', 'state_dict') if use_ema else \
        ('model', 'state_dict', 'state_dict_ema', 'model_ema')
    for key in order:
        inner = checkpoint.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            checkpoint = inner
            break
    out = {}
    for k, v in checkpoint.items():
        if not isinstance(v, torch.Tensor):
            continue  # optimizer state, epoch counters, configs...
        out[k[len('module.'):] if k.startswith('module.') else k] = v
    return out


def check_state_dict(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        skip_prefixes: Iterable[str] = (),
        allow_missing: Iterable[str] = (),
        model_name: Optional[str] = None,
) -> None:
    """Raise one clear :class:`CheckpointError` when a key is missing, unexpected or mis-shaped.

    Classifier keys are skipped (``skip_prefixes``): timm drops or adapts them itself when ``num_classes`` differs.

    Args:
        state_dict: The remapped checkpoint.
        model: The model it should load into.
        skip_prefixes: Key prefixes not checked.
        allow_missing: Key suffixes that may be absent (non-persistent or derived buffers).
        model_name: Name used in messages (defaults to the class name).
    """
    name = model_name or getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
    skip = tuple(skip_prefixes)
    allow = tuple(allow_missing)
    expected = model.state_dict()
    problems = []
    for k, v in expected.items():
        if skip and k.startswith(skip):
            continue
        if k not in state_dict:
            if not (allow and k.endswith(allow)):
                problems.append(f"missing key '{k}' (expected shape {tuple(v.shape)})")
        elif tuple(state_dict[k].shape) != tuple(v.shape):
            problems.append(
                f"key '{k}' has shape {tuple(state_dict[k].shape)} in the checkpoint, but {name} expects "
                f"{tuple(v.shape)}")
    for k in state_dict:
        if k not in expected and not (skip and k.startswith(skip)):
            problems.append(f"unexpected key '{k}' (shape {tuple(state_dict[k].shape)})")
    if problems:
        more = f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''
        raise CheckpointError(f'checkpoint does not fit {name}: ' + '; '.join(problems[:5]) + more)


def finish_tap_state_dict(
        out: Dict[str, torch.Tensor],
        model: nn.Module,
        target: Dict[str, torch.Tensor],
        family: str,
) -> Dict[str, torch.Tensor]:
    """Last steps of a TAP-family (FAN / RVT) checkpoint filter, on the already remapped ``out``.

    Checks that TAP weights (``dilation_predictor``) and the model agree (``model.num_scales`` > 0 iff present), fills
    absent BatchNorm ``num_batches_tracked`` counters from ``target`` (the model's state dict), then checks every key
    and shape (classifier keys skipped).

    Args:
        out: Remapped checkpoint (updated in place).
        model: The model it should load into.
        target: ``model.state_dict()``.
        family: Model-name stem for the messages ('fan', 'rvt').

    Returns:
        ``out``.
    """
    has_tap = any('.dilation_predictor.' in k for k in out)
    if has_tap and model.num_scales == 0:
        raise CheckpointError(f'checkpoint has TAP weights (dilation_predictor): build a tap_{family}_* model '
                              f'(num_scales=4), not a plain {family}_* one')
    if not has_tap and model.num_scales > 0:
        raise CheckpointError(f'checkpoint has no TAP weights (dilation_predictor): build a plain {family}_* model, '
                              'or pass num_scales=0')
    for k, v in target.items():
        if k.endswith('num_batches_tracked') and k not in out:
            out[k] = v.clone()
    check_state_dict(out, model, skip_prefixes=('head.',))
    return out


def embed_patches(
        model: nn.Module,
        x: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int]]:
    """Patch-embed images for a ViT-style vitzoo model at any resolution (shared by DeiT-like families).

    Expects ``model.patch_embed`` (timm ``PatchEmbed`` with ``output_fmt='NHWC'``), ``model.pos_embed`` (prefix
    positions first), ``model.patch_size`` and ``model.num_prefix_tokens``.

    Returns:
        ``(tokens (B, h*w, C), pos (1, P + h*w, C) resized to the grid, (h, w))``.
    """
    H, W = x.shape[-2:]
    p = model.patch_size
    if H % p or W % p or H < p or W < p:
        raise ValueError(f'{type(model).__name__}: input size {H}x{W} is not a multiple of the patch size {p} (at least one patch)')
    x = model.patch_embed(x)  # B, h, w, C
    B, h, w, C = x.shape
    pos = model.pos_embed
    gh, gw = model.patch_embed.grid_size
    if not sizes_match((h, w), (gh, gw)):
        # timm's resample_abs_pos_embed (bicubic, antialias) without its size-match early-out, which would
        # specialise a dynamic-shape graph to the example size (bicubic at an equal size is exact anyway)
        P = model.num_prefix_tokens
        grid = pos[:, P:].float().reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode='bicubic', antialias=True).flatten(2).transpose(1, 2)
        pos = torch.cat([pos[:, :P], grid.to(pos.dtype)], dim=1)
    return x.reshape(B, h * w, C), pos, (h, w)


class Mlp(_TimmMlp):
    """timm's ``Mlp`` (same arguments and parameter names) whose GELU runs in place on ``fc1``'s output in inference.

    The hidden activation is the largest tensor of a transformer block (4x the tokens' channels): keeping one copy of
    it instead of two lowers the peak memory of a high-resolution forward by that much (e.g. 77 MB per Swin-T
    stage-1 block at 896²) and saves a pass over it. Identical results (the same GELU kernel); with autograd
    recording, or any other activation, dropout or norm, it is exactly timm's forward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (type(self.act) is nn.GELU and self.act.approximate == 'none' and not self.training
                and isinstance(self.norm, nn.Identity) and not torch.is_grad_enabled()):
            x = self.fc1(x)
            torch.ops.aten.gelu_(x)
            return self.fc2(x)
        return super().forward(x)
