"""mmdet 3.x integration: ``custom_imports=dict(imports=['vitzoo.mmdet'], allow_failed_imports=False)``.

Registers the vitzoo backbones (``AgentPVT``, ``AgentSwinTransformer``, ``AgentCSwin``, ``TAPFAN``) in mmengine's
root model registry, where mmdet's ``MODELS`` finds them; see :mod:`vitzoo.mm`. Imports mmengine (not mmdet).
"""
from vitzoo.mm import (  # noqa: F401
    NO_DECAY_KEYS, TAPFAN, AgentCSwin, AgentPVT, AgentSwinTransformer, load_checkpoint_file, paramwise_no_decay,
    trusted_checkpoints)

__all__ = ['AgentPVT', 'AgentSwinTransformer', 'AgentCSwin', 'TAPFAN', 'NO_DECAY_KEYS', 'paramwise_no_decay',
           'trusted_checkpoints', 'load_checkpoint_file']
