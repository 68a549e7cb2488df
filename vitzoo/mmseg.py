"""mmseg 1.x integration: ``custom_imports=dict(imports=['vitzoo.mmseg'], allow_failed_imports=False)``.

Registers the vitzoo backbones (``AgentPVT``, ``AgentSwinTransformer``, ``AgentCSwin``, ``TAPFAN``) in mmengine's root
model registry, where mmseg's ``MODELS`` finds them, and in mmseg's the segmentor ``ADLEncoderDecoder`` (TAP + ADL's
``loss_ad``) and the official SegFormer MLP decode head ``SegFormerMLPHead``; see :mod:`vitzoo.mm`. Imports mmengine /
mmseg.
"""
from vitzoo.mm import (  # noqa: F401
    NO_DECAY_KEYS, TAPFAN, AgentCSwin, AgentPVT, AgentSwinTransformer, load_checkpoint_file, paramwise_no_decay,
    trusted_checkpoints)
from vitzoo.mm.seg import ADLEncoderDecoder, SegFormerMLPHead  # noqa: F401

__all__ = ['AgentPVT', 'AgentSwinTransformer', 'AgentCSwin', 'TAPFAN', 'ADLEncoderDecoder', 'SegFormerMLPHead',
           'NO_DECAY_KEYS', 'paramwise_no_decay', 'trusted_checkpoints', 'load_checkpoint_file']
