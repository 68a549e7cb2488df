"""vitzoo models: importing this package registers every model family with timm.

Every public module in this folder is one model family (timm style) and is imported here, so that its
``@register_model`` entrypoints are known to ``timm.create_model`` as soon as ``vitzoo`` is imported.
"""
import importlib as _importlib
import pkgutil as _pkgutil

from ._helpers import CheckpointError, check_state_dict, unwrap_state_dict  # noqa: F401

for _m in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _m.name.startswith('_'):
        _importlib.import_module(f'{__name__}.{_m.name}')
