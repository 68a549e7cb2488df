"""Model accounting shared by the tools and tests: registry listing, params, MACs, throughput."""
import fnmatch
import time
from contextlib import contextmanager
from typing import Iterator, List, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = ['list_models', 'count_params', 'count_macs', 'explicit_attention', 'measure_throughput']


def list_models(pattern: Union[str, Sequence[str]] = '*') -> List[str]:
    """Names of the timm models that vitzoo registers (optionally filtered by fnmatch pattern(s))."""
    import timm
    from timm.models import model_entrypoint
    import vitzoo.models  # noqa: F401  (registration)
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    names = [n for n in timm.list_models() if model_entrypoint(n).__module__.startswith('vitzoo.')]
    return sorted(n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns))


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


@contextmanager
def explicit_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily switch every module with a ``fused_attn`` flag to its explicit (materialised) path."""
    saved = [(m, m.fused_attn) for m in model.modules() if hasattr(m, 'fused_attn')]
    try:
        for m, _ in saved:
            m.fused_attn = False
        yield model
    finally:
        for m, v in saved:
            m.fused_attn = v


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Tuple[int, ...] = (3, 224, 224)) -> int:
    """Multiply-accumulates of one forward at ``input_size`` (batch 1), the papers' "FLOPs".

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2) on the explicit attention path: the counter
    does not see every fused CPU attention kernel.
    """
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_size)
    counter = FlopCounterMode(display=False)
    with explicit_attention(model), counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


@torch.no_grad()
def measure_throughput(
        model: nn.Module,
        input_size: Tuple[int, ...] = (3, 224, 224),
        batch_size: int = 8,
        min_time: float = 1.0,
        warmup: int = 1,
) -> float:
    """Images per second of eval-mode forwards (repeats until ``min_time`` seconds have passed)."""
    model.eval()
    x = torch.randn(batch_size, *input_size)
    for _ in range(warmup):
        model(x)
    n, start = 0, time.perf_counter()
    while True:
        model(x)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return n * batch_size / elapsed
