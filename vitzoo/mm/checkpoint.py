"""Checkpoint reading and optimizer settings for the mmengine integration.

Local checkpoints are read weights-only; numpy scalars / dtypes and mmengine's ``HistoryBuffer`` (found in Runner
checkpoints) are allow-listed per call (:func:`runner_safe_globals`). :func:`trusted_checkpoints` swaps mmengine's
local loader for :func:`load_checkpoint_file` while a Runner trains or tests (scoped, restored on exit).
"""
import contextlib
import os
import pickle
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from vitzoo.models import unwrap_state_dict
from vitzoo.weights import UnsafeCheckpointError, safe_load

__all__ = ['NO_DECAY_KEYS', 'paramwise_no_decay', 'runner_safe_globals', 'load_checkpoint_file', 'read_checkpoint',
           'read_state_dict', 'fit_problems', 'trusted_checkpoints', 'PretrainedInitMixin']

# Parameter-name fragments without weight decay in the official dense configs (mmengine ``custom_keys`` match
# substrings): norms, position tables and the six agent biases.
NO_DECAY_KEYS = ('absolute_pos_embed', 'pos_embed', 'relative_position_bias_table', 'norm',
                 'an_bias', 'na_bias', 'ah_bias', 'aw_bias', 'ha_bias', 'wa_bias')


def paramwise_no_decay() -> Dict[str, Any]:
    """``optim_wrapper.paramwise_cfg`` with ``decay_mult=0`` for :data:`NO_DECAY_KEYS`."""
    return dict(custom_keys={k: dict(decay_mult=0.0) for k in NO_DECAY_KEYS})


def runner_safe_globals() -> List[Any]:
    """Globals an mmengine Runner checkpoint needs that are plain data (numpy scalars / dtypes, mmengine buffers)."""
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    dtypes = [type(np.dtype(t)) for t in ('float64', 'float32', 'int64', 'int32', 'bool', 'uint8')]
    return [scalar, np.dtype, np.ndarray, _reconstruct, *dtypes, HistoryBuffer]


def load_checkpoint_file(path: str, map_location: Any = 'cpu', trusted: bool = False) -> Any:
    """Read a local checkpoint with :func:`vitzoo.weights.safe_load` and :func:`runner_safe_globals` allow-listed.

    A file that still needs other globals is unpickled fully only when ``trusted`` (a checkpoint the Runner wrote
    itself, see :func:`trusted_checkpoints`); otherwise a ``pickle.UnpicklingError`` explains what to do.
    """
    try:
        return safe_load(path, map_location=map_location, allow_globals=runner_safe_globals(), trusted=trusted)
    except UnsafeCheckpointError as e:
        raise pickle.UnpicklingError(
            f'{path} needs globals outside the weights-only allow-list ({e}); vitzoo does not unpickle '
            f'untrusted files. Re-save its state_dict (torch.save(ckpt["state_dict"])) or, for a checkpoint '
            f'written by your own mm_train run, pass --trust-checkpoint to tools/mm_test.py.') from e


def read_checkpoint(path: str) -> Any:
    """A local file through :func:`load_checkpoint_file`; URLs and other mmengine schemes through mmengine."""
    if os.path.isfile(os.path.expanduser(path)):
        return load_checkpoint_file(os.path.expanduser(path))
    from mmengine.runner.checkpoint import CheckpointLoader
    return CheckpointLoader.load_checkpoint(path, map_location='cpu')


def read_state_dict(checkpoint: str, prefix: Optional[str], default_prefix: str) -> Tuple[Dict[str, Any], str]:
    """The tensors of ``checkpoint`` under ``prefix`` (prefix removed), and the prefix used.

    Args:
        checkpoint: Path or URL.
        prefix: Take the keys under this prefix; None: ``default_prefix`` when the checkpoint has such keys (a full
            detector / segmentor checkpoint), else every key.
        default_prefix: The module's prefix in a full mm checkpoint ('backbone.', 'decode_head.').
    """
    state_dict = unwrap_state_dict(read_checkpoint(checkpoint))
    if prefix is None and any(k.startswith(default_prefix) for k in state_dict):
        prefix = default_prefix
    if prefix:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict, prefix or ''


def fit_problems(own: Dict[str, torch.Tensor], state_dict: Dict[str, Any], allow_missing: Sequence[str] = (),
                 limit: int = 8) -> List[str]:
    """The missing / unexpected / mis-shaped keys of ``state_dict`` against ``own``, one phrase per kind (empty: fits).

    Args:
        own: The module's ``state_dict()``.
        state_dict: What is to be loaded.
        allow_missing: Key prefixes that may be absent.
        limit: Keys named per kind (the rest are counted).
    """
    allow = tuple(allow_missing)
    missing = [k for k in own if k not in state_dict and not (allow and k.startswith(allow))]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f'{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} here'
              for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    return [f'{label} {items[:limit]}' + (f' (and {len(items) - limit} more)' if len(items) > limit else '')
            for label, items in (('missing', missing), ('unexpected', unexpected), ('shapes', shapes)) if items]


class PretrainedInitMixin:
    """mm ``init_weights`` that loads ``init_cfg=dict(type='Pretrained', checkpoint=..., prefix=...)`` through the
    module's own ``load_pretrained(checkpoint, prefix)`` (which maps and checks the keys) instead of mmengine's."""

    def init_weights(self) -> None:
        """mm init; ``init_cfg=dict(type='Pretrained', checkpoint=...)`` calls ``load_pretrained``."""
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained' and cfg.get('checkpoint'):
            self.load_pretrained(cfg['checkpoint'], prefix=cfg.get('prefix'))
            self._is_init = True
            return
        super().init_weights()


def _is_under(path: str, folders: Sequence[str]) -> bool:
    path = os.path.realpath(path)
    for d in folders:
        d = os.path.realpath(d)
        if os.path.commonpath([path, d]) == d:
            return True
    return False


@contextlib.contextmanager
def trusted_checkpoints(*folders: str, files: Sequence[str] = ()) -> Iterator[None]:
    """While active, mmengine reads local checkpoints through :func:`load_checkpoint_file`.

    Files under ``folders`` (the Runner's own work_dir) or listed in ``files`` may be fully unpickled if the
    weights-only load fails (torch >= 2.6 refuses mmengine's message-hub / numpy metadata); every other file stays
    weights-only. mmengine's loader is restored on exit, so nothing changes globally.
    """
    from mmengine.runner.checkpoint import CheckpointLoader
    schemes = CheckpointLoader._schemes  # mmengine has no public way to replace the '' (local file) scheme
    previous = schemes.get('')
    allowed = [os.path.realpath(f) for f in files]

    def _load_local(filename: str, map_location: Any = None, logger: Any = None) -> Any:
        filename = os.path.expanduser(filename)
        if not os.path.isfile(filename):
            raise FileNotFoundError(f'{filename} can not be found.')
        trusted = _is_under(filename, folders) or os.path.realpath(filename) in allowed
        return load_checkpoint_file(filename, map_location=map_location, trusted=trusted)

    schemes[''] = _load_local
    try:
        yield
    finally:
        if previous is None:
            schemes.pop('', None)
        else:
            schemes[''] = previous
