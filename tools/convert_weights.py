#!/usr/bin/env python3
"""Convert an official checkpoint into timm's hub layout (model.safetensors + config.json), verified, for publishing.

Steps:
  1. sha256 of OFFICIAL_FILE, checked against the manifest (weights/manifest.json) when it records one, or --sha256;
  2. code-free load (torch.load(weights_only=True); training metadata such as yacs configs is read as inert data),
     taking the weights the official evaluation used (manifest ``format.use_ema``, or --ema / --no-ema);
  3. the filtered load: timm.create_model(MODEL, pretrained=True) through the family's checkpoint_filter_fn;
  4. OUT_DIR/model.safetensors (the model's state_dict) and OUT_DIR/config.json (timm's save_config_for_hf, plus a
     "vitzoo" block with the provenance and the sha256 of model.safetensors);
  5. reload of OUT_DIR offline with timm.create_model('local-dir:OUT_DIR', pretrained=True): every tensor and the
     logits on a fixed input must be identical to step 3, or the tool fails;
  6. prints both sha256s and the manifest fields; --update-manifest writes them into the manifest entry.

Publish OUT_DIR as a Hugging Face Hub model repository (e.g. `huggingface-cli upload ORG/NAME OUT_DIR`), then record
the repository with --hf-hub-id; timm.create_model(MODEL, pretrained=True) then prefers it over the authors' URL.
--eval-dir evaluates the converted model on an ImageNet-style folder (one sub-folder per class, in class-index order).

Examples:
  python tools/convert_weights.py agent_deit_small ~/Downloads/agent_deit_s.pth out/agent_deit_small.in1k
  python tools/convert_weights.py tap_fan_base_16_p4_hybrid tapadl_fan_base.pth.tar out/tap_fan --update-manifest
  python tools/convert_weights.py agent_deit_small agent_deit_s.pth out/ads --eval-dir /data/imagenet/val
  python tools/convert_weights.py agent_deit_tiny tiny_official.pth out/t --num-classes 10 \\
      --model-kwargs '{"embed_dim": 64, "depth": 2, "num_heads": 2}' --manifest /tmp/test_manifest.json
"""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # the reload must come from OUT_DIR, never from the network

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

import timm

try:
    import vitzoo
except ModuleNotFoundError as e:  # the tools use the installed package
    raise SystemExit('vitzoo is not installed: `pip install -e .` in the vitzoo checkout') if e.name == 'vitzoo' else e
from vitzoo import weights as vw


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog='convert_weights.py', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('model', metavar='MODEL', help="vitzoo model name, optionally with its tag ('sat_deit_small.cub')")
    p.add_argument('official_file', metavar='OFFICIAL_FILE', help='the checkpoint as downloaded from the authors')
    p.add_argument('out_dir', metavar='OUT_DIR', help='output folder (created; existing files are overwritten)')
    p.add_argument('--model-kwargs', default='{}', metavar='JSON',
                   help="extra create_model kwargs as a JSON object, e.g. reduced test configs: "
                        "'{\"embed_dim\": 64, \"depth\": 2, \"num_heads\": 2}'")
    p.add_argument('--num-classes', type=int, default=None,
                   help="classes of the checkpoint's classifier (default: read from the checkpoint, else the cfg's)")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument('--ema', dest='use_ema', action='store_true', default=None,
                     help='convert the EMA weights (state_dict_ema / model_ema)')
    ema.add_argument('--no-ema', dest='use_ema', action='store_false',
                     help='convert the non-EMA weights (default: what the official evaluation used, per manifest)')
    p.add_argument('--sha256', default=None, help='expected sha256 of OFFICIAL_FILE (default: the manifest\'s)')
    p.add_argument('--no-verify', action='store_true', help='skip the sha256 check of OFFICIAL_FILE')
    p.add_argument('--manifest', default=None,
                   help=f'manifest to check against / update (default: ${vw.MANIFEST_ENV} or weights/manifest.json)')
    p.add_argument('--update-manifest', action='store_true',
                   help="record sha256, file name and size of OFFICIAL_FILE and the sha256 of model.safetensors in "
                        "the manifest entry (the entry must exist: URLs, metrics and license are curated by hand)")
    p.add_argument('--hf-hub-id', default=None, metavar='ORG/NAME',
                   help='with --update-manifest: the Hub repository the converted folder is published to')
    p.add_argument('--seed', type=int, default=0, help='seed of the fixed check input')
    p.add_argument('--eval-dir', default=None, metavar='DIR',
                   help='evaluate the converted model on this ImageNet-style folder (class sub-folders) and print '
                        'top-1 / top-5, with the model\'s eval transform')
    p.add_argument('--eval-batch-size', type=int, default=64, help='batch size of --eval-dir')
    p.add_argument('--eval-workers', type=int, default=4, help='data loader workers of --eval-dir')
    p.add_argument('--eval-limit', type=int, default=0, help='evaluate only the first N images (0: all)')
    return p.parse_args(argv)


def _classifier_classes(state_dict: Dict[str, torch.Tensor], cfg: Dict[str, Any]) -> Optional[int]:
    names = cfg.get('classifier') or ()
    for name in [names] if isinstance(names, str) else names:
        w = state_dict.get(f'{name}.weight')
        if w is not None:
            return int(w.shape[0])
    return None


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def _compare(ref: torch.nn.Module, new: torch.nn.Module, x: torch.Tensor) -> Dict[str, Any]:
    sd_ref, sd_new = ref.state_dict(), new.state_dict()
    problems = [k for k in sd_ref if k not in sd_new or not torch.equal(sd_ref[k], sd_new[k])]
    problems += [k for k in sd_new if k not in sd_ref]
    with torch.no_grad():
        y_ref, y_new = ref(x), new(x)
    y_ref = y_ref[0] if isinstance(y_ref, (tuple, list)) else y_ref
    y_new = y_new[0] if isinstance(y_new, (tuple, list)) else y_new
    return dict(tensors_differing=problems, logits_identical=torch.equal(y_ref, y_new),
                logits_max_abs_diff=_max_abs_diff(y_ref, y_new))


def save_export(model: torch.nn.Module, out_dir: Path, model_args: Dict[str, Any], provenance: Dict[str, Any]) -> str:
    """Write model.safetensors + config.json (timm hub layout); returns the sha256 of model.safetensors."""
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf
    out_dir.mkdir(parents=True, exist_ok=True)
    # contiguous private copies: safetensors refuses tensors that share storage
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    weights_file = out_dir / 'model.safetensors'
    save_file(tensors, str(weights_file), metadata={'format': 'pt'})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights_file, 0o666 & ~umask)  # safetensors creates it private; exports are meant to be shared
    digest = vw.sha256sum(weights_file)
    config_file = out_dir / 'config.json'
    save_config_for_hf(model, str(config_file), model_args=model_args)
    with open(config_file, encoding='utf-8') as f:
        config = json.load(f)
    # top-level extras are ignored by timm's config parser; vitzoo checks weights_sha256 when loading the folder
    config['vitzoo'] = dict(provenance, weights_file=weights_file.name, weights_sha256=digest)
    with open(config_file, 'w', encoding='utf-8') as f:
        json.dump(config, f, indent=2)
        f.write('\n')
    return digest


def update_manifest(path: Path, key: str, fields: Dict[str, Any], converted: Dict[str, Any]) -> None:
    """Write the observed fields into the manifest entry ``key`` (which must exist)."""
    with open(path, encoding='utf-8') as f:
        manifest = json.load(f)
    entry = manifest.get('models', {}).get(key)
    if entry is None:
        raise SystemExit(f'error: {path} has no entry {key!r}; add it by hand first (URLs, metrics, license)')
    entry.update(fields)
    entry['converted'] = dict(entry.get('converted') or {}, **converted)
    tmp = path.with_suffix('.json.tmp')
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write('\n')
    tmp.replace(path)


def evaluate(model: torch.nn.Module, root: str, batch_size: int, workers: int, limit: int) -> Dict[str, Any]:
    """Top-1 / top-5 (%) of ``model`` on an ImageNet-style folder, with the model's eval transform."""
    from timm.data import ImageDataset, create_transform, resolve_data_config
    data_cfg = resolve_data_config(model=model)
    dataset = ImageDataset(root, transform=create_transform(**data_cfg))
    if limit:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    correct1 = correct5 = n = 0
    k = min(5, model.num_classes)
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            top = out.topk(k, dim=1).indices
            correct1 += (top[:, 0] == y).sum().item()
            correct5 += (top == y[:, None]).any(dim=1).sum().item()
            n += len(y)
    return dict(images=n, top1=100.0 * correct1 / max(n, 1), top5=100.0 * correct5 / max(n, 1),
                data_config={k: list(v) if isinstance(v, tuple) else v for k, v in data_cfg.items()})


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    manifest_file = Path(args.manifest) if args.manifest else vw.manifest_path()
    manifest = vw.load_manifest(manifest_file)
    model_kwargs = json.loads(args.model_kwargs)
    if not isinstance(model_kwargs, dict):
        raise SystemExit('error: --model-kwargs must be a JSON object')
    arch, _, tag = args.model.partition('.')
    if not timm.is_model(arch) or not timm.models.model_entrypoint(arch).__module__.startswith('vitzoo.'):
        raise SystemExit(f'error: {arch!r} is not a vitzoo model (see vitzoo.utils.list_models())')
    cfg = timm.models.resolve_pretrained_cfg(arch, tag or None)
    key = f'{arch}.{cfg.tag}' if cfg.tag else arch
    entry = vw.manifest_entry(key, manifest)
    official = Path(args.official_file)

    print(f'vitzoo {vitzoo.__version__} | timm {timm.__version__} | torch {torch.__version__}')
    print(f'model {key}; manifest {manifest_file}: ' + ('entry found' if entry else 'no entry'))
    t0 = time.perf_counter()
    official_sha = vw.sha256sum(official)
    if args.no_verify:
        print(f'{official.name}: sha256 {official_sha} (not checked: --no-verify)')
    elif args.sha256 or (entry and entry.get('sha256')):
        vw.verify_sha256(official, args.sha256 or entry['sha256'], what=key)
        print(f'{official.name}: sha256 {official_sha} verified')
    else:
        print(f'{official.name}: sha256 {official_sha} (no digest recorded yet: --update-manifest records it)')
    state_dict = vw.load_checkpoint(official, key, sha256=[], use_ema=args.use_ema, manifest=manifest)  # checked

    num_classes = args.num_classes or _classifier_classes(state_dict, cfg.to_dict()) or cfg.num_classes
    create_kwargs = dict(model_kwargs, num_classes=num_classes)
    ref = timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=dict(
        state_dict=state_dict, num_classes=num_classes), **create_kwargs).eval()
    ref.pretrained_cfg.pop('state_dict', None)
    del state_dict

    out_dir = Path(args.out_dir)
    use_ema = args.use_ema if args.use_ema is not None else bool(entry and entry.get('format', {}).get('use_ema'))
    provenance = dict(model=key, source_file=official.name, source_sha256=official_sha,
                      source_weights='ema' if use_ema else 'non-ema', vitzoo_version=vitzoo.__version__,
                      timm_version=timm.__version__, converted_with='tools/convert_weights.py')
    converted_sha = save_export(ref, out_dir, create_kwargs, provenance)

    # the check: timm's offline local-dir loading (through vitzoo's verification when the family uses it)
    new = timm.create_model(f'local-dir:{out_dir.resolve()}', pretrained=True).eval()
    size = tuple(ref.pretrained_cfg.get('input_size', (3, 224, 224)))
    x = torch.randn((2, *size), generator=torch.Generator().manual_seed(args.seed))
    check = _compare(ref, new, x)
    ok = not check['tensors_differing'] and check['logits_identical']
    print(f"reload of {out_dir}/ with timm (local-dir): tensors identical: {not check['tensors_differing']}, "
          f"logits identical: {check['logits_identical']} (max abs diff {check['logits_max_abs_diff']:.3g}) on a "
          f"fixed {tuple(x.shape)} input")
    if not ok:
        raise SystemExit(f"error: the converted folder does not reproduce the filtered load "
                         f"(differing tensors: {check['tensors_differing'][:5]})")

    fields = dict(sha256=official_sha, filename=official.name, size=official.stat().st_size)
    converted = dict(sha256=converted_sha, vitzoo_version=vitzoo.__version__, timm_version=timm.__version__)
    if args.hf_hub_id:
        converted['hf_hub_id'] = args.hf_hub_id
    print(f'sha256 {official_sha}  {official}')
    print(f"sha256 {converted_sha}  {out_dir / 'model.safetensors'}")
    print('manifest fields: ' + json.dumps(dict(fields, converted=converted)))
    if args.update_manifest:
        if model_kwargs:
            print('warning: --model-kwargs changes the architecture; the digests recorded are of that variant')
        update_manifest(manifest_file, key, fields, converted)
        print(f'updated {manifest_file} [{key}]')
    result = dict(model=key, official_sha256=official_sha, converted_sha256=converted_sha, out_dir=str(out_dir),
                  check=check, seconds=round(time.perf_counter() - t0, 2))
    if args.eval_dir:
        result['eval'] = evaluate(new, args.eval_dir, args.eval_batch_size, args.eval_workers, args.eval_limit)
        e = result['eval']
        print(f"eval on {args.eval_dir}: {e['images']} images, top-1 {e['top1']:.2f}%, top-5 {e['top5']:.2f}% "
              f"(input {e['data_config']['input_size']}, crop_pct {e['data_config']['crop_pct']}, "
              f"{e['data_config'].get('crop_mode', 'center')}, {e['data_config']['interpolation']})")
    return result


if __name__ == '__main__':
    try:
        main()
    except (vw.WeightsError, vitzoo.models.CheckpointError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)
