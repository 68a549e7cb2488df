"""Helpers of ``tools/train.py``: safe checkpoints, exact resume, per-method losses.

- Checkpoints hold only tensors and primitives (RNG states are stored as tensors), are written atomically (temporary
  file in the same folder + ``os.replace``) and load with :func:`vitzoo.weights.safe_load` (weights-only).
- Exact resume: the sampler's order depends only on ``(seed, epoch)`` and can skip the batches already done; the
  augmentation of a sample is seeded from ``(seed, epoch, index)`` (:class:`SeededDataset`), so neither depends on the
  number of workers or on where a run was interrupted; the global RNGs (dropout, drop-path, mixup) are restored from
  the checkpoint.
- :class:`MethodLoss` picks the training loss of a model family (ADL for TAP models, Sparsifiner's two phases, SAT)
  and calls the model through :class:`TrainWrapper`, so that DDP sees every forward.
"""
import math
import os
import random
import tempfile
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.data

from vitzoo.distributed import ShardSampler  # noqa: F401  (public here before vitzoo.distributed existed)
from vitzoo.weights import safe_load

__all__ = ['TrainError', 'atomic_save', 'load_checkpoint', 'get_rng_state', 'set_rng_state', 'SeededDataset',
           'ResumableSampler', 'ShardSampler', 'method_of', 'TrainWrapper', 'MethodLoss', 'to_primitive', 'logits_of',
           'check_head', 'soft_ce']


class TrainError(ValueError):
    """A bad training configuration or input; ``tools/train.py`` prints its message as a one-line error."""


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints


def to_primitive(obj: Any) -> Any:
    """Keep only what ``torch.load(weights_only=True)`` accepts: tensors, numbers, str, None, lists / tuples / dicts."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, dict):
        return {k: to_primitive(v) for k, v in obj.items() if _storable(v)}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_primitive(v) for v in obj)
    raise TypeError(f'cannot store {type(obj).__name__} in a weights-only checkpoint')


def _storable(v: Any) -> bool:
    try:
        to_primitive(v)
        return True
    except TypeError:
        return False


def atomic_save(obj: Dict, path: str) -> None:
    """``torch.save`` to a temp file next to ``path``, fsync, then rename onto it (readers never see half a file)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str) -> Dict:
    """Load a checkpoint with :func:`vitzoo.weights.safe_load` (no code runs); clear error if missing or unreadable."""
    if not os.path.isfile(path):
        raise TrainError(f'checkpoint not found: {path}')
    try:
        return safe_load(path)
    except Exception as e:  # truncated / foreign files, pickles that would run code
        raise TrainError(f'cannot read checkpoint {path}: {type(e).__name__}: {e}') from e


# ----------------------------------------------------------------------------------------------------------------------
# RNG states as tensors


def get_rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) RNG states as tensors / primitives."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        'python': torch.tensor(py[1], dtype=torch.int64), 'python_version': py[0],
        'python_gauss': py[2],
        'numpy': torch.from_numpy(np_state[1].astype(np.int64)), 'numpy_pos': int(np_state[2]),
        'numpy_has_gauss': int(np_state[3]), 'numpy_gauss': float(np_state[4]),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`."""
    random.setstate((state['python_version'], tuple(int(v) for v in state['python'].tolist()), state['python_gauss']))
    np.random.set_state(('MT19937', state['numpy'].numpy().astype(np.uint32), state['numpy_pos'],
                         state['numpy_has_gauss'], state['numpy_gauss']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


# ----------------------------------------------------------------------------------------------------------------------
# data order and augmentation that do not depend on the interruption point


class SeededDataset(torch.utils.data.Dataset):
    """Seeds Python / NumPy / torch from ``(seed, epoch, index)`` before each sample's transform.

    Random augmentation of a sample is then a function of the sample and the epoch only: the same whatever the worker
    that loads it and wherever a run was resumed. Set :attr:`epoch` before creating each epoch's iterator.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int = 0):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        # index >= len: a repeat of sample index % len (ResumableSampler num_repeats), augmented with its own seed
        s = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(index)
        s %= 2 ** 63
        # restore the global states afterwards: in the main process (num_workers 0) they also drive dropout / mixup
        py, npy = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(s)
            np.random.seed(s % 2 ** 32)
            torch.manual_seed(s)
            try:
                return self.dataset[int(index) % len(self.dataset)]
            finally:
                random.setstate(py)
                np.random.set_state(npy)


class ResumableSampler(torch.utils.data.Sampler):
    """Shuffled, rank-sharded sampler whose order depends only on ``(seed, epoch)``; can skip a prefix.

    Like ``DistributedSampler`` (each rank takes every ``world``-th index of one permutation, padded to equal length)
    with ``set_start(n)`` to skip the first ``n`` samples of this rank's share (the batches already trained).

    ``num_repeats > 1`` is repeated augmentation as timm's ``RepeatAugSampler`` (DeiT's ``RASampler``): every index of
    the permutation appears ``num_repeats`` times in a row, so its copies go to different ranks, and each rank takes
    ``len // 256 * 256 / world`` samples per epoch (``ceil(len / world)`` below 256). Copy ``r`` of sample ``i`` is
    yielded as ``i + r * num_samples``: :class:`SeededDataset` loads sample ``i`` with its own augmentation seed.
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 num_repeats: int = 1):
        if int(num_repeats) != num_repeats or num_repeats < 1:
            raise ValueError(f'num_repeats must be an integer >= 1, got {num_repeats}')
        self.n = num_samples
        self.rank = rank
        self.world = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0
        self.repeats = int(num_repeats)
        if self.repeats == 1:
            self.per_rank = math.ceil(num_samples / world_size)
        elif num_samples >= 256:
            self.per_rank = num_samples // 256 * 256 // world_size
        else:
            self.per_rank = math.ceil(num_samples / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        self.start = start

    def _indices(self) -> list:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        if self.repeats > 1:
            idx = [i + r * self.n for i in idx for r in range(self.repeats)]
            total = math.ceil(len(idx) / self.world) * self.world
            idx += idx[:total - len(idx)]
            return idx[self.rank:total:self.world][:self.per_rank]
        total = self.per_rank * self.world
        idx += idx[:total - len(idx)]
        return idx[self.rank:total:self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start


# ----------------------------------------------------------------------------------------------------------------------
# method losses

METHODS = ('none', 'adl', 'sparsifiner', 'sat')


def method_of(model_name: str) -> str:
    """Default method loss of a model family: 'adl' (tap_*), 'sparsifiner' (sparsifiner_*), 'sat' (sat_*), 'none'."""
    name = model_name.split('.')[0]
    if name.startswith('tap_'):
        return 'adl'
    if name.startswith('sparsifiner_'):
        return 'sparsifiner'
    if name.startswith('sat_'):
        return 'sat'
    return 'none'


class TrainWrapper(nn.Module):
    """Routes the method's forward (``forward_dict``, ``forward_loc``, ``return_attn``) through ``forward``.

    DDP synchronises gradients only of calls to the wrapped module's ``forward``; wrapping this module (not the model)
    keeps the method forwards synchronised.
    """

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, x: torch.Tensor, plain: bool = False):
        if plain:  # the model's own forward (logits), e.g. the patch-augmented pass of --patch-aug
            return self.model(x)
        if self.method == 'adl':
            return self.model(x, return_attn=True)
        if self.method == 'sparsifiner':
            return self.model.forward_dict(x)
        if self.method == 'sat':
            return self.model.forward_loc(x)
        return self.model(x)


class MethodLoss(nn.Module):
    """Total training loss of a method and its logged terms.

    Args:
        method: 'none', 'adl', 'sparsifiner' or 'sat'.
        cls_loss: Task criterion ``(logits, target)`` (handles mixup soft targets).
        adl: ``AttentionDiversificationLoss`` for 'adl'.
        sparsifiner: ``SparsifinerLoss`` for 'sparsifiner'.
        sat: ``SATLoss`` for 'sat' (its ``cls_loss`` set to ``cls_loss``).
    """

    def __init__(self, method: str, cls_loss: nn.Module, adl: Optional[nn.Module] = None,
                 sparsifiner: Optional[nn.Module] = None, sat: Optional[nn.Module] = None):
        super().__init__()
        if method not in METHODS:
            raise TrainError(f'unknown method {method!r}; choose one of {", ".join(METHODS)}')
        self.method = method
        self.cls_loss = cls_loss
        self.adl = adl
        self.sparsifiner = sparsifiner
        self.sat = sat

    def forward(self, x: torch.Tensor, output: Any, target: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        if self.method == 'adl':
            logits, attn = output
            cls = self.cls_loss(logits, target)
            adl = self.adl(attn)
            return cls + adl, {'cls_loss': cls.item(), 'adl_loss': adl.item()}
        if self.method == 'sparsifiner':
            loss, parts = self.sparsifiner(x, output, target)
            return loss, {k: float(v.detach()) for k, v in parts.items()}
        if self.method == 'sat':
            loss, parts = self.sat(output, target, return_terms=True)
            return loss, {f'{k}_loss': float(v) for k, v in parts.items()}
        return self.cls_loss(output, target), {}


def logits_of(output: Any) -> torch.Tensor:
    """Logits of any of the method forwards' outputs."""
    if isinstance(output, dict):
        return output['logits']
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def check_head(state_dict: Dict[str, torch.Tensor], model: nn.Module, classifier: Sequence[str], path: str) -> None:
    """Clear error when a checkpoint's classifier does not match the model's class count (or other shapes differ)."""
    own = model.state_dict()
    for k, v in state_dict.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            if any(k.startswith(c + '.') for c in classifier) and v.dim() >= 1:
                raise TrainError(
                    f'class-count mismatch: {path} has a {v.shape[0]}-class classifier ({k}: {tuple(v.shape)}) but '
                    f'the model has {own[k].shape[0]} classes (--num-classes / the dataset)')
            raise TrainError(f'{path}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}')


def soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with hard (B,) or soft (B, classes) targets."""
    if target.dtype.is_floating_point and target.shape == logits.shape:
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, target)
