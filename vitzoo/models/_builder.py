"""Model builder and checkpoint reading: sha256 checks, downloads, code-free loading, timm's builder on top.

The model files' ``_create_*`` functions call :func:`build_model_with_cfg`; :mod:`vitzoo.weights` is the public
facade of this module and documents the rules (which files are checked, why vitzoo reads the bytes itself).
"""
import argparse
import hashlib
import json
import logging
import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Set, Tuple, Union
from urllib.parse import urlparse

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg as _timm_build_model_with_cfg
from timm.models import resolve_pretrained_cfg
from timm.models._hub import download_cached_file

from ._helpers import unwrap_state_dict
from ._manifest import _lookup, _split, load_manifest, manifest_cfg, manifest_entry, no_weights_reason

__all__ = [
    'WeightsError', 'ChecksumError', 'UnsafeCheckpointError', 'sha256sum', 'verify_sha256', 'safe_load',
    'select_state_dict', 'load_checkpoint', 'find_weights_file', 'resolve_pretrained', 'build_model_with_cfg',
    'manifest_cfg',
]

_logger = logging.getLogger(__name__)

_EMA_KEYS = ('state_dict_ema', 'model_ema')
_SHA256 = re.compile(r'^[0-9a-f]{64}$')
# the files timm's local-dir / hub loaders look for, in their order of preference
_PREFERRED_FILES = ('model.safetensors', 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth')
_EXTENSIONS = ('.safetensors', '.pth', '.pth.tar', '.bin')


class WeightsError(RuntimeError):
    """Pretrained weights cannot be found, fetched or read."""


class ChecksumError(WeightsError):
    """A weights file does not have the sha256 the manifest (or the caller) expects; nothing was loaded."""


class UnsafeCheckpointError(WeightsError):
    """A checkpoint needs to run code to be unpickled: refused (full unpickle only with ``safe_load(trusted=True)``)."""


# ---- hashing --------------------------------------------------------------------------------------------------------


def sha256sum(path: Union[str, Path], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(chunk_size), b''):
            h.update(chunk)
    return h.hexdigest()


def _normalise(expected: Union[None, str, Iterable[str]]) -> Set[str]:
    if expected is None:
        return set()
    items = [expected] if isinstance(expected, str) else list(expected)
    out = set()
    for e in items:
        e = (e or '').strip().lower()
        if not e:
            continue
        if not _SHA256.match(e):
            raise ValueError(f'not a sha256 hex digest: {e!r}')
        out.add(e)
    return out


def verify_sha256(path: Union[str, Path], expected: Union[str, Iterable[str]], what: str = '') -> str:
    """Check that ``path`` has one of the ``expected`` sha256 digests; returns its digest or raises ChecksumError."""
    wanted = _normalise(expected)
    actual = sha256sum(path)
    if wanted and actual not in wanted:
        raise ChecksumError(
            f"sha256 mismatch for {path}{f' ({what})' if what else ''}: the file has {actual}, expected "
            f"{' or '.join(sorted(wanted))}. Nothing was loaded. The file is corrupt, incomplete or not the official "
            f"one; download it again, or if the authors re-released it, record the new digest with "
            f"`tools/convert_weights.py ... --update-manifest`.")
    return actual


# ---- code-free loading ----------------------------------------------------------------------------------------------


# Metadata types found in the official training checkpoints, read as data: argparse.Namespace has no custom reduce
# (timm allows it too); a yacs CfgNode (a dict subclass) is mapped by name onto OrderedDict, which torch's weights-only
# unpickler can fill and restore the attributes of, so yacs is never imported and none of its code runs.
_INERT_GLOBALS = [argparse.Namespace, (OrderedDict, 'yacs.config.CfgNode')]


def _is_safetensors(path: Path) -> bool:
    if path.suffix == '.safetensors':
        return True
    with open(path, 'rb') as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header
    return len(head) == 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') < (1 << 31)


def safe_load(
        path: Union[str, Path],
        map_location: Union[str, torch.device] = 'cpu',
        *,
        allow_globals: Sequence[Any] = (),
        trusted: bool = False,
) -> Any:
    """Read a checkpoint without running code: safetensors, or ``torch.load(weights_only=True)``.

    The one checkpoint reader of vitzoo (model weights, training checkpoints, mm Runner checkpoints).

    Args:
        path: Checkpoint file.
        map_location: Device for the tensors.
        allow_globals: Extra globals the weights-only unpickler may build for this call (``torch.serialization``'s
            ``safe_globals`` entries: a class, or ``(class, 'module.Name')``), e.g. numpy scalars in Runner files.
        trusted: Fall back to a full unpickle when the weights-only load fails. Only for files the caller wrote
            itself (its own training run): a full unpickle runs whatever code the file names.

    Raises:
        UnsafeCheckpointError: The pickle needs a global outside torch's weights-only allowlist (plus the inert
            metadata types above and ``allow_globals``) and ``trusted`` is False; the message names it.
    """
    path = Path(path)
    if _is_safetensors(path):
        from safetensors.torch import load_file
        return load_file(str(path), device=str(map_location))
    try:
        with torch.serialization.safe_globals([*_INERT_GLOBALS, *allow_globals]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if trusted:
            return torch.load(path, map_location=map_location, weights_only=False)
        found = re.findall(r'Unsupported global: GLOBAL ([\w.]+)', str(e))
        found = found or re.findall(r'but got (<[^>]+>)', str(e))
        raise UnsafeCheckpointError(
            f"refusing to load {path}: unpickling it would run code"
            f"{' (needs ' + ', '.join(sorted(set(found))) + ')' if found else ''}. vitzoo loads checkpoints with "
            f"torch.load(weights_only=True) or safetensors only and never falls back to a full unpickle. If you "
            f"trust the file, re-save just its tensors (torch.save(state_dict)) or convert it with "
            f"tools/convert_weights.py on a machine where you can inspect it.") from e


def select_state_dict(checkpoint: Any, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint: the ``model`` / ``state_dict`` (or EMA) entry, without DDP ``module.`` prefixes.

    Args:
        checkpoint: What :func:`safe_load` returned.
        use_ema: Take ``state_dict_ema`` / ``model_ema``; an error when the checkpoint has neither.
    """
    if use_ema and not (isinstance(checkpoint, dict) and any(k in checkpoint for k in _EMA_KEYS)):
        keys = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise WeightsError(f'EMA weights requested but the checkpoint has no {" / ".join(_EMA_KEYS)} (it has {keys})')
    state_dict = unwrap_state_dict(checkpoint, use_ema=use_ema)
    if not state_dict:
        raise WeightsError('the checkpoint holds no tensors')
    return state_dict


def _cache_name(key: str, url: str, entry: Optional[Dict[str, Any]]) -> str:
    """File name of a download in timm's cache: the official name, else the URL's, else one from the model key."""
    if entry and entry.get('filename'):
        return entry['filename']
    return os.path.basename(urlparse(url).path) or f'vitzoo-{key}.pth'


def _official_names(key: str, entry: Dict[str, Any]) -> Set[str]:
    names = {_cache_name(key, u, entry) for u in entry.get('urls') or []}
    if entry.get('filename'):
        names.add(entry['filename'])
    return names


def _known_digests(entry: Optional[Dict[str, Any]]) -> Set[str]:
    if not entry:
        return set()
    return _normalise([entry.get('sha256') or '', (entry.get('converted') or {}).get('sha256') or ''])


def load_checkpoint(
        path: Union[str, Path],
        model_name: Optional[str] = None,
        *,
        sha256: Union[None, str, Iterable[str]] = None,
        strict: bool = False,
        use_ema: Optional[bool] = None,
        map_location: Union[str, torch.device] = 'cpu',
        manifest: Optional[Dict[str, Any]] = None,
) -> Dict[str, torch.Tensor]:
    """Verify, then load the weights of an (official) checkpoint file, code-free.

    The returned dict keeps the file's key names (official layout); the family's ``checkpoint_filter_fn`` maps it.

    Args:
        path: Checkpoint (``.pth`` / ``.pth.tar`` / legacy pickle / ``.safetensors``).
        model_name: ``'arch'`` or ``'arch.tag'``: selects the manifest entry (digests, EMA choice).
        sha256: Expected digest(s); overrides the manifest.
        strict: Require one of the manifest's digests (official file or converted ``model.safetensors``) whenever
            the manifest records any. Without it, the manifest digest is only required when the file is recognisably
            the official one (its name is the manifest's ``filename`` or download cache name).
        use_ema: Take the EMA weights; default: the manifest's ``format.use_ema`` (what the official evaluation used),
            else False.
        map_location: Device for the tensors.
        manifest: A parsed manifest (default: :func:`load_manifest`).

    Raises:
        ChecksumError: Digest mismatch (nothing is deserialised).
        UnsafeCheckpointError: The file would run code when unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'weights file not found: {path}')
    key, entry = _lookup(model_name, load_manifest() if manifest is None else manifest) if model_name else (None, None)
    if sha256 is not None:
        expected = _normalise(sha256)
    elif entry and (strict or path.name in _official_names(key, entry)):
        expected = _known_digests(entry) if strict else _normalise(entry.get('sha256') or '')
    else:
        expected = set()
    if expected:
        verify_sha256(path, expected, what=model_name or '')
        _logger.info(f'{path}: sha256 verified')
    checkpoint = safe_load(path, map_location=map_location)
    if use_ema is None:
        use_ema = bool(entry and (entry.get('format') or {}).get('use_ema'))
        if use_ema and not (isinstance(checkpoint, dict) and any(k in checkpoint for k in _EMA_KEYS)):
            # an export (safetensors) holds the already-selected weights; an official file without EMA is odd
            if not _is_safetensors(path):
                _logger.warning(f'{path}: the manifest expects EMA weights for {key}, the file has none: using its '
                                f'non-EMA weights')
            use_ema = False
    return select_state_dict(checkpoint, use_ema=use_ema)


# ---- resolving timm's pretrained sources ----------------------------------------------------------------------------


def find_weights_file(folder: Union[str, Path]) -> Path:
    """The weights file of a timm export folder, by timm's order of preference (``model.safetensors`` first)."""
    folder = Path(folder)
    for name in _PREFERRED_FILES:
        if (folder / name).is_file():
            return folder / name
    for ext in _EXTENSIONS:
        files = sorted(folder.glob(f'*{ext}'))
        if files:
            return files[0]
    raise WeightsError(f'no weights file (model.safetensors, *.pth, *.bin) in {folder}')


def _export_digest(config_file: Path, weights_file: Path) -> Set[str]:
    """The sha256 tools/convert_weights.py recorded for the export's weights file (its config.json)."""
    try:
        with open(config_file, encoding='utf-8') as f:
            info = json.load(f).get('vitzoo') or {}
    except (OSError, ValueError):
        return set()
    if info.get('weights_file', 'model.safetensors') != weights_file.name:
        return set()
    return _normalise(info.get('weights_sha256') or '')


def _fetch_hub(hub_id: str, filename: Optional[str], key: str, entry: Optional[Dict[str, Any]],
               cache_dir: Optional[Union[str, Path]]) -> Tuple[Path, Set[str]]:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError as e:
        raise WeightsError(f'{key}: loading {hub_id} needs huggingface_hub (pip install huggingface_hub)') from e
    repo, _, revision = hub_id.partition('@')
    names = [filename] if filename else ['model.safetensors', 'pytorch_model.bin']
    path = None
    for name in names:
        try:
            path = Path(hf_hub_download(repo, name, revision=revision or None, cache_dir=cache_dir))
            break
        except EntryNotFoundError:
            continue
    if path is None:
        raise WeightsError(f'{key}: none of {names} in the Hugging Face Hub repository {hub_id}')
    expected = set()
    converted = (entry or {}).get('converted') or {}
    if converted.get('hf_hub_id') == repo and path.name == 'model.safetensors':
        expected |= _normalise(converted.get('sha256') or '')
    try:
        config = Path(hf_hub_download(repo, 'config.json', revision=revision or None, cache_dir=cache_dir))
        expected |= _export_digest(config, path)
    except Exception:  # noqa: BLE001  (a missing config.json only means no recorded digest)
        pass
    return path, expected


def _unavailable(key: str, entry: Optional[Dict[str, Any]]) -> WeightsError:
    arch = _split(key)[0]
    reason = no_weights_reason(arch)
    if reason:
        return WeightsError(f'{arch} has no official weights: {reason} Use pretrained=False, or pass your own file '
                            f'with pretrained_cfg_overlay=dict(file=PATH).')
    if entry:
        where = entry.get('source_page') or 'weights/README.md'
        return WeightsError(f'no direct download for {key}: the official weights are only at {where}. Download the '
                            f'file and pass pretrained_cfg_overlay=dict(file=PATH) (see weights/README.md).')
    return WeightsError(f'no pretrained weights for {key} (none in the weights manifest). Use pretrained=False.')


def resolve_pretrained(variant: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Fetch, verify and read the pretrained weights of a ``build_model_with_cfg`` call; returns the new kwargs.

    Follows timm's source priority (``state_dict`` > ``hf-hub:`` / ``local-dir:`` model source > ``file`` >
    ``hf_hub_id`` > ``url``), downloads into timm's cache, checks the sha256 (module docstring), loads code-free with
    :func:`load_checkpoint`, and puts the tensors into ``pretrained_cfg_overlay['state_dict']`` (``file`` records where
    they came from). An in-memory ``state_dict`` passes through unchanged.

    Args:
        variant: Model name (``build_model_with_cfg``'s ``variant``).
        kwargs: Its keyword arguments; ``pretrained_use_ema`` (bool) is consumed here: take the EMA weights (True),
            the non-EMA ones (False) or the manifest's choice (None, default).
    """
    kwargs = dict(kwargs)
    use_ema = kwargs.pop('pretrained_use_ema', None)
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'), pretrained_cfg_overlay=overlay)
    key = f'{cfg.architecture}.{cfg.tag}' if cfg.tag else (cfg.architecture or variant)
    if cfg.state_dict is not None:
        return kwargs
    entry = manifest_entry(key)
    cache_dir = kwargs.get('cache_dir')
    downloaded = False
    expected: Optional[Set[str]] = None  # None: load_checkpoint's rule (the manifest's digest for official names)
    if cfg.source == 'hf-hub' or (not cfg.file and cfg.hf_hub_id and _has_hf_hub()):
        path, expected = _fetch_hub(cfg.hf_hub_id, cfg.hf_hub_filename, key, entry, cache_dir)
    elif cfg.file:
        path = Path(cfg.file)
        if cfg.source == 'local-dir' or path.is_dir():
            path = find_weights_file(path)
            expected = _export_digest(path.parent / 'config.json', path)
    elif cfg.url:
        url = cfg.url if isinstance(cfg.url, str) else cfg.url[0]
        try:
            path = Path(download_cached_file((url, _cache_name(key, url, entry)), check_hash=False,
                                             progress=False, cache_dir=cache_dir))
        except OSError as e:
            status = f" Manifest status: {entry['url_status']}." if entry and entry.get('url_status') else ''
            raise WeightsError(
                f'{key}: could not download {url} ({e}).{status} Download the file yourself and pass '
                f'pretrained_cfg_overlay=dict(file=PATH).') from e
        downloaded = True
        if entry and url in (entry.get('urls') or []):
            expected = _normalise(entry.get('sha256') or '')
            if not expected:
                _logger.warning(f'{key}: no sha256 recorded in the manifest for {url}; loaded unverified (record it '
                                f'with tools/convert_weights.py --update-manifest)')
        else:
            expected = set()
    else:
        raise _unavailable(key, entry)
    try:
        state_dict = load_checkpoint(path, key, sha256=expected, use_ema=use_ema)
    except ChecksumError as e:
        if downloaded:
            path.unlink(missing_ok=True)
            raise ChecksumError(f'{e} The mismatching download was deleted from the cache.') from None
        raise
    overlay.update(state_dict=state_dict, file=str(path), source=None, custom_load=False)
    kwargs['pretrained_cfg_overlay'] = overlay
    return kwargs


def _has_hf_hub() -> bool:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return False
    return True


def _forget_state_dict(model: nn.Module) -> None:
    # timm keeps the resolved pretrained cfg (with our in-memory tensors) on the model and its feature wrappers
    for m in model.modules():
        for attr in ('pretrained_cfg', 'default_cfg'):
            cfg = getattr(m, attr, None)
            if isinstance(cfg, dict):
                cfg.pop('state_dict', None)


def build_model_with_cfg(
        model_cls: Callable[..., nn.Module],
        variant: str,
        pretrained: bool = False,
        **kwargs: Any,
) -> nn.Module:
    """``timm.models.build_model_with_cfg`` with the pretrained weights resolved by :func:`resolve_pretrained`.

    Drop-in for the model files' ``_create_*`` functions: same arguments, plus ``pretrained_use_ema``.
    """
    if pretrained:
        kwargs = resolve_pretrained(variant, kwargs)
    else:
        kwargs.pop('pretrained_use_ema', None)
    model = _timm_build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    if pretrained:
        _forget_state_dict(model)
    return model
