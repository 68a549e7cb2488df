"""Shared by the tools and tests: registry listing, model creation with weights, params, MACs, timing."""
import argparse
import fnmatch
import os
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = ['list_models', 'add_model_args', 'create_model_with_weights', 'count_params', 'count_macs',
           'explicit_attention', 'measure_throughput', 'time_fn', 'time_interleaved', 'interleaved_times']


def list_models(pattern: Union[str, Sequence[str]] = '*') -> List[str]:
    """Names of the timm models that vitzoo registers (optionally filtered by fnmatch pattern(s))."""
    import timm
    from timm.models import model_entrypoint
    import vitzoo.models  # noqa: F401  (registration)
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    names = [n for n in timm.list_models() if model_entrypoint(n).__module__.startswith('vitzoo.')]
    return sorted(n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns))


def add_model_args(
        group: Union[argparse.ArgumentParser, Any],
        default: str = '',
        model_help: str = 'registered timm / vitzoo model name',
        checkpoint_help: str = 'weights file (official or timm layout), loaded through the model\'s checkpoint filter',
        num_classes_help: str = 'classifier classes (default: the dataset\'s)',
) -> None:
    """The evaluation tools' model flags: ``--model/-m``, ``--checkpoint``, ``--pretrained``, ``--num-classes``,
    ``--model-kwargs`` (the arguments of :func:`create_model_with_weights`)."""
    from timm.utils import ParseKwargs
    group.add_argument('--model', '-m', default=default, help=model_help)
    group.add_argument('--checkpoint', default='', metavar='PATH', help=checkpoint_help)
    group.add_argument('--pretrained', action='store_true', help='use the model\'s default pretrained weights')
    group.add_argument('--num-classes', type=int, default=None, help=num_classes_help)
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='K=V',
                       help='extra timm.create_model keyword arguments')


def create_model_with_weights(
        name: str,
        checkpoint: str = '',
        pretrained: bool = False,
        num_classes: Optional[int] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
) -> nn.Module:
    """``timm.create_model`` with the weights of ``checkpoint`` or, with ``pretrained``, the model's own.

    A checkpoint file goes through timm's pretrained path (``pretrained_cfg_overlay=dict(file=...)``): vitzoo's
    verified code-free loader and the family's ``checkpoint_filter_fn`` (official or timm layout).

    Args:
        name: Model name.
        checkpoint: Weights file (takes precedence over ``pretrained``).
        pretrained: Load the pretrained cfg's weights.
        num_classes: Classes of the model and of the checkpoint's classifier (which then loads too); a
            ``num_classes`` in ``model_kwargs`` only sizes the model (timm drops a checkpoint head of another size).
        model_kwargs: Further ``timm.create_model`` arguments.

    Raises:
        FileNotFoundError: ``checkpoint`` is not a file.
    """
    import timm
    kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
        overlay: Dict[str, Any] = dict(file=str(checkpoint))
        if num_classes is not None:
            overlay['num_classes'] = num_classes
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


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


def interleaved_times(
        fns: Dict[str, Callable[[], object]],
        repeats: int = 5,
        warmup: int = 1,
        clock: Callable[[], float] = time.perf_counter,
) -> Dict[str, List[float]]:
    """Seconds (by ``clock``) of each of ``repeats`` calls of every function, after ``warmup`` calls of each.

    The calls are interleaved (one of each per round) so that load changes hit every candidate alike, and the i-th
    times of two functions form a pair (per-round ratios).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = clock()
            fn()
            times[k].append(clock() - t)
    return times


def time_interleaved(fns: Dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> Dict[str, float]:
    """Median seconds of each function, calls interleaved (:func:`interleaved_times`)."""
    return {k: statistics.median(v) for k, v in interleaved_times(fns, repeats, warmup).items()}


def time_fn(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    return time_interleaved({'fn': fn}, repeats=repeats, warmup=warmup)['fn']
