"""Linear layers whose CPU training GEMMs run in oneDNN: the same function as ``F.linear``, a faster step.

Measured on this project's CPU (AMD EPYC with AVX-512 / AVX512-BF16, torch 2.14, one thread, the projection and MLP
shapes of Agent-PVT/Swin/CSwin at batch 8, 224²):

- fp32: aten's GEMMs are MKL's; oneDNN's matmul with the bias fused into the GEMM is 20-25% faster for the forward
  product ``x W^T + b`` and for the input gradient ``g W`` (reading ``W`` transposed in place). MKL stays faster for
  the weight gradient ``g^T x`` (a long reduction over the tokens), so that one stays on ``torch.mm``.
- bf16 (autocast, or bf16 weights): aten's bf16 GEMMs already run in oneDNN, but ``addmm`` first copies the bias
  into the output and accumulates onto it; the fused bias makes the forward product ~25% faster.

Intel Extension for PyTorch makes the same swap for CPU training. It lifts whole Agent-Swin-T / PVT-T / CSwin-T
training steps by ~8-15% (``tools/benchmark.py --suite train``).

Only calls that autograd records on a CPU in fp32 or bf16 take this path; everything else is ``F.linear`` exactly:
inference (``no_grad``: the models' inference paths are tuned around aten's kernels and checked bit for bit),
accelerators, fp16 / fp64, ``torch.compile`` / ``torch.export`` graphs (inductor picks its own kernels) and builds of
torch without the oneDNN op (or without bf16 support, for bf16). Under CPU autocast the inputs are cast exactly as
autocast would cast them for a linear layer. Results equal ``F.linear`` to float rounding (a different summation
order). The backward is once-differentiable; turn the path off with :func:`set_onednn_training` for double backward
(gradient penalties) or aten's exact kernels.

This module imports only torch.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['Linear', 'linear', 'use_onednn', 'compute_dtype', 'onednn_training_enabled', 'set_onednn_training',
           'matmul_bias', 'matmul_grad_input']


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
_BF16 = _ONEDNN_LINEAR is not None and bool(getattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: False)())
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
_enabled = _ONEDNN_LINEAR is not None


def set_onednn_training(enabled: bool) -> None:
    """Route (or stop routing) recorded CPU linear layers through oneDNN (on by default where available).

    Args:
        enabled: True to use oneDNN where available, False for ``F.linear`` everywhere.
    """
    global _enabled
    _enabled = bool(enabled) and _ONEDNN_LINEAR is not None


def onednn_training_enabled() -> bool:
    """Whether recorded CPU linear layers currently run through oneDNN."""
    return _enabled


def matmul_bias(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x @ weight.T + bias`` for a 2-D ``x`` with oneDNN (bias fused); call only where :func:`use_onednn` holds."""
    return _ONEDNN_LINEAR(x, weight, bias, 'none', [], '')


def matmul_grad_input(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``grad @ weight`` (a linear layer's input gradient) with oneDNN reading ``weight`` transposed in place."""
    return _ONEDNN_LINEAR(grad, weight.t(), None, 'none', [], '')


def _grad_recording(tensors) -> bool:
    if not _enabled or not torch.is_grad_enabled() or torch.compiler.is_compiling() \
            or torch.compiler.is_exporting():
        return False
    return all(t.device.type == 'cpu' for t in tensors) and any(t.requires_grad for t in tensors)


def compute_dtype(*tensors: Optional[torch.Tensor]) -> Optional[torch.dtype]:
    """The dtype a linear layer of these tensors (input, weight, bias; None skipped) runs its oneDNN GEMMs in.

    None where the oneDNN path does not apply (see the module docstring); otherwise float32 or bfloat16 — under CPU
    autocast its dtype, else the tensors' own.
    """
    ts = [t for t in tensors if t is not None]
    if not _grad_recording(ts):
        return None
    if torch.is_autocast_enabled('cpu'):
        dtype = torch.get_autocast_dtype('cpu')
        if not all(t.dtype in _ONEDNN_DTYPES for t in ts):
            return None
    else:
        dtype = ts[0].dtype
        if any(t.dtype != dtype for t in ts):
            return None
    if dtype == torch.bfloat16 and not _BF16:
        return None
    return dtype if dtype in _ONEDNN_DTYPES else None


def use_onednn(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a linear layer of these tensors (input, weight, bias; None skipped) takes the oneDNN path."""
    return compute_dtype(*tensors) is not None


class _OneDnnLinear(torch.autograd.Function):
    """``F.linear`` with oneDNN forward / input-gradient GEMMs and aten's weight gradient (MKL for fp32)."""

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
        g = grad.reshape(-1, grad.shape[-1])
        need = ctx.needs_input_grad
        gx = matmul_grad_input(g, weight).view(ctx.shape) if need[0] else None
        gw = g.t().mm(x2) if need[1] else None
        gb = g.sum(0) if ctx.has_bias and need[2] else None
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; its GEMMs in oneDNN when autograd records it on a CPU (module docstring).

    Args:
        x: (..., in_features) input.
        weight: (out_features, in_features).
        bias: (out_features,) or None.
    """
    dtype = compute_dtype(x, weight, bias) if x.dim() >= 1 and x.numel() else None
    if dtype is None:
        return F.linear(x, weight, bias)
    with torch.autocast('cpu', enabled=False):  # cast as autocast would, outside the function (casts get grads)
        return _OneDnnLinear.apply(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


class Linear(nn.Linear):
    """``nn.Linear`` (same arguments, parameters and state_dict) whose CPU training GEMMs run in oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
