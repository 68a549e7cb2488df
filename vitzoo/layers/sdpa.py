"""When ``F.scaled_dot_product_attention`` is the faster way to attend, for the models' fused/explicit switches.

This module imports only torch.
"""
from typing import Optional

import torch

__all__ = ['use_sdpa']

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def use_sdpa(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
) -> bool:
    """Whether to call SDPA on these inputs rather than the explicit matmul-softmax-matmul.

    Yes on accelerators, and whenever the result will not be differentiated. On a CPU with autograd recording, no
    when (measured with torch 2.14, one thread, the models' window/stripe/token shapes):

    - ``attn_mask`` needs a gradient (trainable biases): the CPU flash kernel has no mask gradient, so SDPA falls back
      to its math path, i.e. the explicit computation plus a NaN-safe softmax's extra passes;
    - the inputs are bf16 / fp16 (autocast training): the flash kernel's backward runs 2.5-6x slower than the explicit
      path's (its forward alone is on par or faster, hence the no-gradient case above).

    Args:
        q: Queries.
        k: Keys.
        v: Values.
        attn_mask: The additive mask SDPA would get, if any.
    """
    if q.device.type != 'cpu' or not torch.is_grad_enabled():
        return True
    mask_grad = attn_mask is not None and attn_mask.requires_grad
    if mask_grad:
        return False
    if not (q.requires_grad or k.requires_grad or v.requires_grad):
        return True
    return q.dtype not in _LOW_PRECISION
