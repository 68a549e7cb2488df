"""Linear layers whose CPU fp32 training GEMMs run in oneDNN: the same function as ``F.linear``, a faster step.

aten's fp32 GEMMs on a CPU are MKL's. Measured on this project's CPU (AMD EPYC with AVX-512, torch 2.14, one thread,
the projection and MLP shapes of Agent-PVT/Swin/CSwin at batch 8, 224²), oneDNN's matmul with the bias fused into the
GEMM is 20-25% faster for the forward product ``x W^T + b`` and for the input gradient ``g W`` (reading ``W``
transposed in place); MKL stays faster for the weight gradient ``g^T x`` (a long reduction over the tokens), so that
one stays on ``torch.mm``. Intel Extension for PyTorch makes the same swap for CPU training. Whole Agent-Swin-T /
PVT-T / CSwin-T fp32 training steps get ~8-15% faster (``tools/benchmark.py --suite train --train-linear``).

Only calls that autograd records on a CPU in fp32 take this path; everything else is ``F.linear`` exactly: inference
(``no_grad``: the models' inference paths are tuned around aten's kernels and checked bit for bit), accelerators,
other dtypes, CPU autocast (its bf16 GEMMs already run in oneDNN: the same swap measured 0.99-1.01x there),
``torch.compile`` / ``torch.export`` graphs (inductor picks its own kernels) and builds of torch without the oneDNN op.
Results equal ``F.linear`` to float rounding (a different summation order). The backward is once-differentiable; turn
the path off with :func:`set_onednn_training` for double backward (gradient penalties) or aten's exact kernels.

This module imports only torch.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['Linear', 'linear', 'use_onednn', 'onednn_training_enabled', 'set_onednn_training',
           'matmul_bias', 'matmul_grad_input', 'linear_grads']


def _onednn_linear_op():
    # torch.ops.mkldnn._linear_pointwise: oneDNN matmul + fused bias, the kernel inductor's CPU backend emits for
    # linear layers. It takes plain (strided) tensors; absent from builds without oneDNN.
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear_op()
_enabled = _ONEDNN_LINEAR is not None


def set_onednn_training(enabled: bool) -> None:
    """Route (or stop routing) recorded CPU fp32 linear layers through oneDNN (on by default where available).

    Args:
        enabled: True to use oneDNN where available, False for ``F.linear`` everywhere.
    """
    global _enabled
    _enabled = bool(enabled) and _ONEDNN_LINEAR is not None


def onednn_training_enabled() -> bool:
    """Whether recorded CPU fp32 linear layers currently run through oneDNN."""
    return _enabled


def matmul_bias(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        onednn: bool = True,
) -> torch.Tensor:
    """``x @ weight.T + bias`` for a 2-D ``x``: oneDNN with the bias fused, or aten's ``addmm`` / ``mm``.

    Args:
        x: (M, in_features).
        weight: (out_features, in_features).
        bias: (out_features,) or None.
        onednn: oneDNN (only where :func:`use_onednn` holds) or aten.
    """
    if onednn:
        return _ONEDNN_LINEAR(x, weight, bias, 'none', [], '')
    return x.mm(weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def matmul_grad_input(grad: torch.Tensor, weight: torch.Tensor, onednn: bool = True) -> torch.Tensor:
    """``grad @ weight`` (a linear layer's input gradient); oneDNN reads ``weight`` transposed in place."""
    return _ONEDNN_LINEAR(grad, weight.t(), None, 'none', [], '') if onednn else grad.mm(weight)


def linear_grads(
        grad: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        need: Tuple[bool, bool, bool],
        onednn: bool = True,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Input, weight and bias gradients of ``x @ weight.T + bias`` for 2-D ``grad`` / ``x`` (None where not needed).

    The weight gradient is always ``torch.mm`` (MKL: faster than oneDNN for its long reduction over the tokens); with
    ``onednn`` False all three are autograd's own expressions for ``addmm``.
    """
    gx = matmul_grad_input(grad, weight, onednn) if need[0] else None
    gw = grad.t().mm(x) if need[1] else None
    gb = grad.sum(0) if need[2] else None
    return gx, gw, gb


def _grad_recording(tensors) -> bool:
    if not _enabled or not torch.is_grad_enabled() or torch.compiler.is_compiling() \
            or torch.compiler.is_exporting():
        return False
    return all(t.device.type == 'cpu' for t in tensors) and any(t.requires_grad for t in tensors)


def use_onednn(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a linear layer of these tensors (input, weight, bias; None skipped) takes the oneDNN path."""
    ts = [t for t in tensors if t is not None]
    return _grad_recording(ts) and all(t.dtype == torch.float32 for t in ts) and not torch.is_autocast_enabled('cpu')


class _OneDnnLinear(torch.autograd.Function):
    """``F.linear`` with oneDNN forward / input-gradient GEMMs and MKL's weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.shape = x.shape
        ctx.has_bias = bias is not None
        return matmul_bias(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        gx, gw, gb = linear_grads(g, x2, weight, (need_x, need_w, ctx.has_bias and need_b))
        return None if gx is None else gx.view(ctx.shape), gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; its GEMMs in oneDNN when autograd records it on a CPU in fp32 (module docstring).

    Args:
        x: (..., in_features) input.
        weight: (out_features, in_features).
        bias: (out_features,) or None.
    """
    if x.dim() >= 1 and x.numel() and use_onednn(x, weight, bias):
        return _OneDnnLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same arguments, parameters and state_dict) whose CPU fp32 training GEMMs run in oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
