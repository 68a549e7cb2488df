"""Official weights: the manifest, verified code-free loading, and the pretrained hook of vitzoo's model files.

``weights/manifest.json`` records, per ``model.tag``, where the authors host the official weights (direct URL, or only
a source page when the file sits in a Google Drive folder), the file's format, its sha256 (empty until a maintainer has
seen the file, see ``tools/convert_weights.py --update-manifest``), the paper's metrics and the license; models without
official weights are listed with the reason. This module reads it and provides:

- :func:`manifest_cfg`: the ``url`` / ``hf_hub_id`` / ``license`` / ``description`` fields of a model's pretrained cfg,
  so the model files' ``default_cfgs`` point at the manifest;
- :func:`load_checkpoint`: sha256 check, then a load that cannot run code (safetensors, or
  ``torch.load(weights_only=True)``), returning the weights the official evaluation used;
- :func:`build_model_with_cfg`: timm's builder, with the pretrained weights resolved, verified and read here first.
  timm then runs the family's ``checkpoint_filter_fn``, the ``in_chans`` / classifier adaptation and the strict load
  exactly as usual (the tensors reach it as the pretrained cfg's in-memory ``state_dict`` source).

Why vitzoo reads the bytes instead of leaving it to timm's loaders (details in ``weights/README.md``):

1. the sha256 is checked before anything is deserialised: a mismatch raises :class:`ChecksumError` and nothing is
   loaded (a mismatching download is deleted from the cache so that a retry downloads it again);
2. official training checkpoints carry metadata objects (Agent-Attention: a yacs ``CfgNode`` under ``'config'``;
   timm / DeiT trainers: an ``argparse.Namespace`` under ``'args'``) that ``weights_only`` loading refuses (timm's
   loader allows the Namespace, not the CfgNode): here both are read as inert data (an ``OrderedDict`` / a
   ``Namespace``), never imported or executed;
3. the EMA choice follows the official evaluation (manifest ``format.use_ema``), not timm's EMA-first rule: the TAP+ADL
   README numbers come from ``state_dict``, while timm's file loader would prefer a ``state_dict_ema`` next to it;
4. Tsinghua Cloud links (``.../f/<id>/?dl=1``) have no file name in their path, which timm's URL loader needs; they are
   downloaded through timm's cache (``download_cached_file``) under a name from the manifest.

Which files are checked: a download from the manifest's URL or Hugging Face Hub repository always (when a sha256 is
recorded); a local file when it is recognisably the official file (its name is the manifest's ``filename`` or the
cache name used for downloads); a timm export folder (``local-dir:``) against the sha256 that
``tools/convert_weights.py`` wrote into its ``config.json``. Other local files (your own fine-tunes) load unchecked but
still code-free. :func:`load_checkpoint` with ``strict=True`` or an explicit ``sha256`` checks any file.

The code lives in ``vitzoo/models/_builder.py`` (builder, checkpoint reading) and ``vitzoo/models/_manifest.py``
(manifest), timm's layout, exported by :mod:`vitzoo.models`; this module is their public face.
"""
from vitzoo.models import (
    MANIFEST_ENV, ChecksumError, UnsafeCheckpointError, WeightsError, build_model_with_cfg, find_weights_file,
    load_checkpoint, load_manifest, manifest_cfg, manifest_entry, manifest_path, no_weights_reason, resolve_pretrained,
    safe_load, select_state_dict, sha256sum, verify_sha256)

__all__ = [
    'WeightsError', 'ChecksumError', 'UnsafeCheckpointError', 'MANIFEST_ENV', 'manifest_path', 'load_manifest',
    'manifest_entry', 'no_weights_reason', 'manifest_cfg', 'sha256sum', 'verify_sha256', 'safe_load',
    'select_state_dict', 'load_checkpoint', 'find_weights_file', 'resolve_pretrained', 'build_model_with_cfg',
]
