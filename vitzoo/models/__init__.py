"""vitzoo models: importing this package registers every model family with timm.

Every public module in this folder is one model family (timm style) and is imported here, so that its
``@register_model`` entrypoints are known to ``timm.create_model`` as soon as ``vitzoo`` is imported. The builder and
checkpoint reading (``_builder``) and the weights manifest (``_manifest``) are public here and in
:mod:`vitzoo.weights`.
"""
import importlib as _importlib
import pkgutil as _pkgutil

from ._builder import (  # noqa: F401  (timm's layout: the builder's public names live in the models package)
    ChecksumError, UnsafeCheckpointError, WeightsError, build_model_with_cfg, find_weights_file, load_checkpoint,
    resolve_pretrained, safe_load, select_state_dict, sha256sum, verify_sha256)
from ._helpers import CheckpointError, Mlp, check_state_dict, unwrap_state_dict  # noqa: F401
from ._manifest import (  # noqa: F401
    MANIFEST_ENV, load_manifest, manifest_cfg, manifest_entry, manifest_path, no_weights_reason)

for _m in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _m.name.startswith('_'):
        _importlib.import_module(f'{__name__}.{_m.name}')
