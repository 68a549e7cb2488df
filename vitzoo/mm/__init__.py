"""OpenMMLab (mmengine / mmdet 3.x / mmseg 1.x) integration of the vitzoo models.

- :mod:`vitzoo.mm.backbones`: the backbones ``AgentPVT``, ``AgentSwinTransformer``, ``AgentCSwin``, ``TAPFAN``,
  registered in mmengine's root ``MODELS`` registry (found by mmdet and mmseg);
- :mod:`vitzoo.mm.seg`: the TAP + ADL segmentor ``ADLEncoderDecoder`` and the ``SegFormerMLPHead`` decode head,
  registered in mmseg's registry (imports mmseg: loaded on first access of these names, or by ``vitzoo.mmseg``);
- :mod:`vitzoo.mm.checkpoint`: weights-only checkpoint reading (:func:`load_checkpoint_file`,
  :func:`trusted_checkpoints`) and ``paramwise_no_decay``;
- :mod:`vitzoo.mm.runner`: what ``tools/mm_train.py`` / ``tools/mm_test.py`` share (arguments, config, Runner).

Configs import ``vitzoo.mmdet`` or ``vitzoo.mmseg`` (``custom_imports``); importing ``vitzoo`` itself never imports
mmengine.
"""
from typing import Any

from .backbones import TAPFAN, AgentCSwin, AgentPVT, AgentSwinTransformer
from .checkpoint import (
    NO_DECAY_KEYS, load_checkpoint_file, paramwise_no_decay, read_checkpoint, runner_safe_globals, trusted_checkpoints)
from .runner import add_runner_args, build_runner, load_config, parse_runner_args

__all__ = ['AgentPVT', 'AgentSwinTransformer', 'AgentCSwin', 'TAPFAN', 'ADLEncoderDecoder', 'SegFormerMLPHead',
           'NO_DECAY_KEYS', 'paramwise_no_decay', 'runner_safe_globals', 'load_checkpoint_file', 'read_checkpoint',
           'trusted_checkpoints', 'add_runner_args', 'parse_runner_args', 'load_config', 'build_runner']

_SEG = ('ADLEncoderDecoder', 'SegFormerMLPHead')


def __getattr__(name: str) -> Any:
    # the segmentation parts import mmseg; mmdet-only installs use the backbones without it
    if name in _SEG:
        from . import seg
        return getattr(seg, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
