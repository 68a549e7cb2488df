"""The weights manifest (``weights/manifest.json``): official URLs, digests, formats and metrics per ``model.tag``.

Read by the builder (:mod:`vitzoo.models._builder`) and by the model files' ``default_cfgs`` (:func:`manifest_cfg`);
the public entry point is :mod:`vitzoo.weights`.
"""
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

__all__ = ['MANIFEST_ENV', 'manifest_path', 'load_manifest', 'manifest_entry', 'no_weights_reason', 'manifest_cfg']

_logger = logging.getLogger(__name__)

MANIFEST_ENV = 'VITZOO_WEIGHTS_MANIFEST'
_DEFAULT_MANIFEST = Path(__file__).resolve().parents[2] / 'weights' / 'manifest.json'

_manifest_cache: Dict[Tuple[str, float], Dict[str, Any]] = {}


def manifest_path() -> Path:
    """The manifest in use: ``$VITZOO_WEIGHTS_MANIFEST`` if set, else ``weights/manifest.json`` of the source tree."""
    env = os.environ.get(MANIFEST_ENV)
    return Path(env) if env else _DEFAULT_MANIFEST


def load_manifest(path: Optional[Union[str, Path]] = None) -> Dict[str, Any]:
    """The parsed manifest (cached until the file changes); an empty one when the file does not exist.

    The manifest lives in the source tree (``weights/``), next to the package: a wheel install without it has no
    URLs in its pretrained cfgs, and local files still load (see ``weights/README.md``).
    """
    path = Path(path) if path is not None else manifest_path()
    try:
        stamp = path.stat().st_mtime
    except FileNotFoundError:
        return {'models': {}, 'no_official_weights': {}, 'families': {}}
    key = (str(path), stamp)
    if key not in _manifest_cache:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
        for section in ('models', 'no_official_weights', 'families'):
            data.setdefault(section, {})
        _manifest_cache.clear()
        _manifest_cache[key] = data
    return _manifest_cache[key]


def _split(name: str) -> Tuple[str, str]:
    arch, _, tag = name.partition('.')
    return arch, tag


def _lookup(name: str, manifest: Dict[str, Any]) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    models = manifest['models']
    if name in models:
        return name, models[name]
    arch, tag = _split(name)
    keys = [] if tag else [k for k in models if _split(k)[0] == arch]
    if len(keys) > 1:
        from timm.models import get_pretrained_cfg
        cfg = get_pretrained_cfg(arch)
        keys = [k for k in keys if cfg is not None and k == f'{arch}.{cfg.tag}']
    return (keys[0], models[keys[0]]) if len(keys) == 1 else (None, None)


def manifest_entry(name: str, manifest: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """The manifest entry of ``'arch.tag'``; for a bare ``'arch'``, its only entry or the one of timm's default tag."""
    return _lookup(name, load_manifest() if manifest is None else manifest)[1]


def no_weights_reason(name: str, manifest: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """Why ``name`` (arch or arch.tag) has no official weights, if the manifest lists it as such."""
    manifest = load_manifest() if manifest is None else manifest
    item = manifest['no_official_weights'].get(_split(name)[0])
    if item is None:
        return None
    return item['reason'] if isinstance(item, dict) else str(item)


def _family(entry: Dict[str, Any], manifest: Dict[str, Any]) -> Dict[str, Any]:
    return manifest['families'].get(entry.get('family', ''), {})


_METRIC_LABELS = {
    'imagenet1k_top1': 'ImageNet-1k top-1', 'imagenet_c_mce': 'ImageNet-C mCE', 'imagenet_a_top1': 'ImageNet-A top-1',
    'imagenet_p_mfr': 'ImageNet-P mFR', 'cub_top1_loc': 'CUB top-1 loc', 'cub_top5_loc': 'CUB top-5 loc',
    'cub_gt_known_loc': 'CUB GT-known loc', 'imagenet_top1_loc': 'ImageNet top-1 loc',
    'imagenet_top5_loc': 'ImageNet top-5 loc', 'imagenet_gt_known_loc': 'ImageNet GT-known loc',
}


def manifest_cfg(name: str) -> Dict[str, Any]:
    """Pretrained-cfg fields of ``'arch.tag'`` from the manifest, for a model file's ``default_cfgs``.

    Returns ``url`` (the first official URL), ``hf_hub_id`` (once converted weights are published), ``license`` and a
    ``description`` with the paper's metrics as the official README reports them; ``{}`` when the manifest has no
    entry. Never raises: a broken manifest must not break ``import vitzoo`` (the manifest tests catch it).
    """
    try:
        manifest = load_manifest()
        entry = manifest['models'].get(name)
    except (OSError, ValueError, KeyError, TypeError) as e:
        _logger.warning(f'weights manifest {manifest_path()} unreadable ({e}): no pretrained URL for {name}')
        return {}
    if not entry:
        return {}
    out: Dict[str, Any] = {}
    if entry.get('urls'):
        out['url'] = entry['urls'][0]
    hub = (entry.get('converted') or {}).get('hf_hub_id')
    if hub:
        out['hf_hub_id'] = hub
    license_ = entry.get('license') or _family(entry, manifest).get('license')
    if license_:
        out['license'] = license_
    metrics = ', '.join(f'{_METRIC_LABELS[k]} {v}' for k, v in (entry.get('metrics') or {}).items()
                        if k in _METRIC_LABELS)
    out['description'] = f"{entry.get('official_name', name)}, official weights{': ' + metrics if metrics else ''}"
    return out

