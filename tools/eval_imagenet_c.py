#!/usr/bin/env python3
"""Evaluate a timm / vitzoo classifier on ImageNet-C (mCE, relative mCE), ImageNet-A / -R, or any folder corrupted
with the ImageNet-C protocol ("ShapesNet-C"); write ImageNet-C trees; plot CE comparisons.

Modes:
  ImageNet-C tree   --data-dir ROOT with ROOT/<corruption>/<severity 1..5>/<wnid>/<img>.JPEG (the released set).
                    The 15 benchmark corruptions (all required unless --corruptions names a subset) plus the 4 extra
                    ones (speckle_noise, gaussian_blur, spatter, saturate) when present.
  generate          --generate-from DIR (a clean ImageFolder DIR/<class>/<img>): corrupt every image with the
                    ImageNet-C protocol (Resize(--resize) -> CenterCrop(--img-size) -> imagecorruptions at severity s
                    -> JPEG q85), on the fly in the loader workers, or with --write ROOT written to disk as an
                    ImageNet-C tree first (resumable; then evaluated if --model is given). Deterministic: each image
                    is corrupted under a NumPy seed hashed from (--seed, corruption, severity, image index).
  ImageNet-A / -R   --subset imagenet-a|imagenet-r --data-dir DIR/<wnid>/<img>: a 1000-class model's logits are
                    restricted to the 200 classes (wnid list and 1k indices from timm's data/_info files).
  compare           --compare a.json b.json ... --output DIR: bar chart of CE per corruption (DIR/ce_compare.png).

Preprocessing (summary.json records the transform behind every number: "protocol_description", "clean_transform"):
  ImageNet-C images --protocol crop (default): CenterCrop(--img-size) only, the released 224x224 pixels unchanged. This
                    is hendrycks/robustness ImageNet-C/test.py and what the official TAPADL evaluations do (RVT
                    engine.py eval_inc: CenterCrop(224); FAN validate_ood.py: timm's loader at crop_pct 1.0, i.e.
                    Resize(224) -> CenterCrop(224), the identity on 224x224 images).
                    --protocol resize (google-research/augmix imagenet.py): Resize(R) -> CenterCrop(C), bilinear
                    unless --interpolation, R = --resize or round(C * 256 / 224).
  clean, -A, -R     the model's own eval transform, as timm builds it from the pretrained cfg: crop_pct, crop_mode
                    ('center' keeps the aspect ratio, 'squash' resizes both sides), interpolation, mean / std, at
                    --img-size C. This is what the official evaluations do (TAPADL RVT main.py --eval and its -A / -R
                    loaders: the model's test transform; FAN validate_ood.py: resolve_data_config + create_loader).
                    --crop-pct, --crop-mode and --interpolation override the cfg; --resize R sets the resize size
                    (otherwise floor(C / crop_pct)).
  generating        the ImageNet-C creation protocol (make_imagenet_c.py), the same for every model: Resize(R)
                    (shorter side, bilinear) -> CenterCrop(C) -> corrupt -> JPEG q85; the corrupted C x C images are
                    then evaluated with --protocol. The clean source folder is evaluated like clean images above.

Metrics: per (corruption, severity) top-1 / top-5 error; CE_c = mean_s err / AlexNet err[c] (constants keyed by
name, vitzoo.metrics); mCE over the 15 (x100); relative mCE = mean_c (mean_s err - clean err) / (AlexNet err[c] -
AlexNet clean err 43.5 %) (needs --clean-dir or --clean-error); mean corruption accuracy.

Outputs in --output DIR: results.csv (one row per corruption x severity), summary.json, ce.png (CE per corruption),
cells/<corruption>_<severity>.json (finished cells: a rerun with the same settings skips them; other settings in the
same DIR are refused unless --overwrite). Distributed: torchrun --nproc_per_node N tools/eval_imagenet_c.py ... shards
each cell across ranks (no padding, so counts are exact) and sums the counts on all ranks; rank 0 writes.

Examples:
  python tools/eval_imagenet_c.py --model agent_deit_tiny --checkpoint agent_deit_t.pth --data-dir /data/imagenet-c \\
      --clean-dir /data/imagenet/val --output out/inc_agent_t --amp -b 256 -j 16
  torchrun --nproc_per_node 8 tools/eval_imagenet_c.py --model tap_fan_base_16_p4_hybrid --pretrained \\
      --data-dir /data/imagenet-c --clean-error 15.7 --output out/inc_fan
  python tools/eval_imagenet_c.py --generate-from data/shapes/val --write data/shapesnet_c --img-size 64 --resize 73 \\
      --model agent_deit_tiny --checkpoint out/train/model_best.pth.tar --num-classes 10 --output out/shapes_c
  python tools/eval_imagenet_c.py --subset imagenet-r --data-dir /data/imagenet-r --model agent_deit_small --pretrained
  python tools/eval_imagenet_c.py --compare out/inc_a/summary.json out/inc_b/summary.json --output out/compare
"""
import argparse
import csv
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.utils.data

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

try:
    import vitzoo  # noqa: F401  (registers the models)
except ModuleNotFoundError as e:  # the tools use the installed package
    raise SystemExit('vitzoo is not installed: `pip install -e .` in the vitzoo checkout') if e.name == 'vitzoo' else e
from vitzoo.data.imagenet_c import (CorruptedImageDataset, ImageListDataset, ImageNetCError, imagenet_c_cell,
                                    imagenet_subset_info, present_corruptions, scan_image_folder, write_imagenet_c)
from vitzoo.distributed import Distributed, DistributedError, ShardSampler
from vitzoo.metrics import (ALEXNET_CLEAN_ERR, ALL_CORRUPTIONS, CORRUPTION_GROUPS, CORRUPTIONS, EXTRA_CORRUPTIONS,
                            SEVERITIES, imagenet_c_summary)
from vitzoo.utils import add_model_args, create_model_with_weights

_logger = logging.getLogger('eval_imagenet_c')

CSV_FIELDS = ('corruption', 'group', 'severity', 'images', 'skipped', 'top1_err', 'top5_err', 'top1_acc', 'top5_acc',
              'images_per_s')
PROTOCOLS = {
    'crop': 'hendrycks/robustness: CenterCrop(C) only, no resize (the released images are already 224x224)',
    'resize': 'augmix: Resize(R) -> CenterCrop(C)',
}
CROP_MODES = ('center', 'squash', 'border')
INTERPOLATIONS = ('bilinear', 'bicubic', 'nearest', 'lanczos', 'box', 'hamming')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0], epilog=__doc__[__doc__.index('Modes'):],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group('Data')
    g.add_argument('--data-dir', default='', metavar='DIR',
                   help='ImageNet-C root (<corruption>/<severity>/<class>/<img>), or the ImageNet-A/-R folder')
    g.add_argument('--subset', default='imagenet-c', choices=('imagenet-c', 'imagenet-a', 'imagenet-r'),
                   help='dataset kind (default: imagenet-c); -a / -r use the 200-class logit masks')
    g.add_argument('--generate-from', default='', metavar='DIR',
                   help='clean ImageFolder to corrupt with the ImageNet-C protocol (on the fly, or see --write)')
    g.add_argument('--write', default='', metavar='ROOT',
                   help='with --generate-from: write the corrupted images as an ImageNet-C tree to ROOT (resumable), '
                        'then evaluate ROOT if --model is given')
    g.add_argument('--corruptions', nargs='+', default=None, metavar='NAME',
                   help='corruptions to evaluate/write (default: the 15 + the extra 4 present; when generating: all '
                        '19); "common" = the 15, "extra" = the 4, "all" = the 19, "noise" / "blur" / "weather" / '
                        '"digital" = that group of the 15')
    g.add_argument('--severities', nargs='+', type=int, default=list(SEVERITIES), metavar='S',
                   help='severities (default: 1 2 3 4 5; CE / mCE need all five)')
    g.add_argument('--seed', type=int, default=0, help='corruption seed (generation) and torch seed (default: 0)')
    g.add_argument('--clean-dir', default='', metavar='DIR',
                   help='clean ImageFolder for the clean error (relative mCE); default with --generate-from: that '
                        'folder')
    g.add_argument('--clean-error', type=float, default=None, metavar='PCT',
                   help='clean top-1 error in percent (instead of evaluating --clean-dir)')
    g.add_argument('--no-clean', action='store_true', help='do not evaluate the --generate-from folder as clean')
    g.add_argument('--alexnet-clean-error', type=float, default=100 * ALEXNET_CLEAN_ERR, metavar='PCT',
                   help=f'AlexNet clean error for relative mCE (default {100 * ALEXNET_CLEAN_ERR:g})')
    add_model_args(p.add_argument_group('Model'),
                   checkpoint_help='training checkpoint or state_dict (loaded with weights_only=True through timm, so '
                                   'a model\'s checkpoint_filter_fn applies)',
                   num_classes_help='classifier classes (default: the number of class folders; 1000 for -a / -r)')
    g = p.add_argument_group('Evaluation')
    g.add_argument('--img-size', type=int, default=None, metavar='C',
                   help='crop size C (default: the model cfg input size, else 224); also the generation crop')
    g.add_argument('--resize', type=int, default=None, metavar='R',
                   help='resize size R: generation and --protocol resize (default round(C * 256 / 224)); clean / -A / '
                        '-R (default floor(C / crop_pct))')
    g.add_argument('--protocol', default='crop', choices=tuple(PROTOCOLS),
                   help='ImageNet-C preprocessing: crop (hendrycks, default) or resize (augmix)')
    g.add_argument('--crop-pct', type=float, default=None, metavar='F',
                   help='clean / -A / -R crop fraction (default: the model cfg\'s)')
    g.add_argument('--crop-mode', default=None, choices=CROP_MODES,
                   help='clean / -A / -R crop mode (default: the model cfg\'s): center keeps the aspect ratio, squash '
                        'resizes both sides to the same size, border pads')
    g.add_argument('--interpolation', default=None, choices=INTERPOLATIONS,
                   help='resize interpolation of clean / -A / -R (default: the model cfg\'s) and of --protocol resize '
                        '(default: bilinear, as augmix)')
    g.add_argument('-b', '--batch-size', type=int, default=64, metavar='N', help='batch size per process')
    g.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='data loading workers per process')
    g.add_argument('--amp', action='store_true', help='autocast (bf16 on CPU; --amp-dtype on CUDA)')
    g.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'), help='CUDA autocast dtype')
    g.add_argument('--channels-last', action='store_true', help='channels-last input/model (helps conv stems)')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    g.add_argument('--fail-on-broken', action='store_true', help='unreadable images are an error, not a skip')
    g = p.add_argument_group('Output')
    g.add_argument('--output', default='', metavar='DIR', help='results.csv, summary.json, ce.png, cells/ (resume)')
    g.add_argument('--overwrite', action='store_true', help='discard finished cells of other settings in --output')
    g.add_argument('--compare', nargs='+', default=None, metavar='JSON', help='plot CE of these summary.json files')
    g.add_argument('--no-progress', action='store_true', help='no progress bar')
    return p


# ----------------------------------------------------------------------------------------------------------- helpers
def _corruption_list(args: argparse.Namespace, root: Optional[Path]) -> List[str]:
    if args.corruptions:
        names: List[str] = []
        for n in args.corruptions:
            n = n.strip().replace('-', '_')
            groups = {g: [c for c in CORRUPTIONS if CORRUPTION_GROUPS[c] == g]
                      for g in ('noise', 'blur', 'weather', 'digital')}
            names += {'common': list(CORRUPTIONS), 'extra': list(EXTRA_CORRUPTIONS), 'all': list(ALL_CORRUPTIONS),
                      **groups}.get(n, [n])
        bad = [n for n in names if n not in ALL_CORRUPTIONS]
        if bad:
            raise ImageNetCError(f'unknown corruptions {bad} (known: {", ".join(ALL_CORRUPTIONS)})')
        return [c for c in ALL_CORRUPTIONS if c in names]  # canonical order, no duplicates
    if root is None:  # generating: all 19
        return list(ALL_CORRUPTIONS)
    present = set(present_corruptions(root))
    missing = [c for c in CORRUPTIONS if c not in present]
    if missing:
        raise ImageNetCError(f'missing corruption folders under {root}: {", ".join(missing)} (mCE needs all 15; pass '
                             f'--corruptions to evaluate a subset)')
    return list(CORRUPTIONS) + [c for c in EXTRA_CORRUPTIONS if c in present]


def _imagenet_c_transforms(crop: int, resize: int, mean, std, interpolation: str):
    """The two ImageNet-C protocols: hendrycks' CenterCrop only, augmix's Resize(R) -> CenterCrop(C)."""
    from torchvision import transforms as T
    from timm.data.transforms import str_to_interp_mode
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    return {
        'crop': T.Compose([T.CenterCrop(crop)] + norm),
        'resize': T.Compose([T.Resize(resize, interpolation=str_to_interp_mode(interpolation)), T.CenterCrop(crop)]
                            + norm),
    }


def model_eval_transform(crop: int, crop_pct: float, crop_mode: str, interpolation: str, mean, std,
                         resize: Optional[int] = None) -> Tuple[Any, str]:
    """The model's eval transform, as timm's ``transforms_imagenet_eval`` builds it; ``(transform, description)``.

    The resize size is ``resize`` or timm's ``floor(crop / crop_pct)``. 'center': Resize(s) of the shorter side ->
    CenterCrop(crop); 'squash': Resize((s, s)) -> CenterCrop(crop) (aspect ratio not kept); 'border': the longer side
    to s, then centre crop / pad with the mean colour.
    """
    from torchvision import transforms as T
    from timm.data.transforms import CenterCropOrPad, ResizeKeepRatio, str_to_interp_mode
    if crop_mode not in CROP_MODES:
        raise ImageNetCError(f'crop mode must be one of {CROP_MODES}, got {crop_mode!r}')
    if interpolation not in INTERPOLATIONS:
        raise ImageNetCError(f'interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}')
    if not 0.0 < crop_pct <= 1.0:
        raise ImageNetCError(f'--crop-pct must be in (0, 1], got {crop_pct}')
    scale = int(resize) if resize is not None else math.floor(crop / crop_pct)
    if scale < crop and crop_mode != 'border':
        raise ImageNetCError(f'resize {scale} is smaller than the crop {crop}')
    mode = str_to_interp_mode(interpolation)
    if crop_mode == 'squash':
        steps = [T.Resize((scale, scale), interpolation=mode), T.CenterCrop(crop)]
        desc = f'Resize(({scale}, {scale}), {interpolation}) -> CenterCrop({crop})'
    elif crop_mode == 'border':
        steps = [ResizeKeepRatio((scale, scale), longest=1.0, interpolation=interpolation),
                 CenterCropOrPad(crop, fill=[round(255 * v) for v in mean])]
        desc = f'ResizeKeepRatio(longest side {scale}, {interpolation}) -> CenterCropOrPad({crop})'
    else:
        steps = [T.Resize(scale, interpolation=mode), T.CenterCrop(crop)]
        desc = f'Resize({scale}, {interpolation}) (shorter side) -> CenterCrop({crop})'
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)]), f'{crop_mode}: {desc}'


def _first_size(samples: Sequence[Tuple[str, int]]) -> Optional[Tuple[int, int]]:
    from PIL import Image
    for path, _ in samples[:8]:
        try:
            with Image.open(path) as im:
                return im.size
        except OSError:
            continue
    return None


def _fingerprint(args: argparse.Namespace, crop: int, resize: int, num_classes: int,
                 transforms: Sequence[str] = ()) -> Dict[str, Any]:
    ckpt = None
    if args.checkpoint:
        st = Path(args.checkpoint).stat()
        ckpt = {'path': str(Path(args.checkpoint).absolute()), 'size': st.st_size}
    return {
        'model': args.model, 'checkpoint': ckpt, 'pretrained': bool(args.pretrained), 'num_classes': num_classes,
        'model_kwargs': dict(args.model_kwargs), 'protocol': args.protocol, 'img_size': crop, 'resize': resize,
        'source': 'on-the-fly' if args.generate_from and not args.write else 'tree',
        'data': str(Path(args.generate_from if args.generate_from and not args.write else args.data_dir).absolute()),
        'seed': args.seed if args.generate_from and not args.write else None, 'amp': bool(args.amp),
        'amp_dtype': args.amp_dtype if args.amp else None, 'transforms': list(transforms),
    }


def _evaluate_loader(model: torch.nn.Module, ds: torch.utils.data.Dataset, args: argparse.Namespace, dd: Distributed,
                     logit_index: Optional[torch.Tensor] = None, desc: str = '') -> Dict[str, Any]:
    """Top-1 / top-5 counts of ``model`` on ``ds`` over all ranks; unreadable images (label -1) are counted apart."""
    device = dd.device
    loader = torch.utils.data.DataLoader(
        ds, batch_size=args.batch_size, sampler=ShardSampler(len(ds), dd.rank, dd.world_size), num_workers=args.workers,
        pin_memory=device.type == 'cuda', persistent_workers=False,
        prefetch_factor=4 if args.workers > 0 else None)
    amp_dtype = torch.bfloat16 if device.type == 'cpu' or args.amp_dtype == 'bfloat16' else torch.float16
    top1 = top5 = n = 0
    broken: List[int] = []
    bar = None
    if not args.no_progress and dd.rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(loader.sampler), desc=desc, unit='img', leave=False)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for x, y, idx in loader:
            ok = y >= 0
            if not bool(ok.all()):  # index only then: x[ok] is an unpinned copy
                broken += idx[~ok].tolist()
                x, y = x[ok], y[ok]
            if y.numel():
                x = x.to(device, non_blocking=True)
                if args.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = y.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
                    logits = model(x)
                logits = logits.float()
                if logit_index is not None:
                    logits = logits.index_select(1, logit_index)
                k = min(5, logits.shape[1])
                pred = logits.topk(k, dim=1).indices
                hit = pred == y[:, None]
                top1 += int(hit[:, 0].sum())
                top5 += int(hit.any(dim=1).sum())
                n += int(y.numel())
            if bar is not None:
                bar.update(len(idx))
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    top1, top5, n, nb, seconds = dd.sum([top1, top5, n, len(broken), seconds])
    broken_all = dd.gather_lists(broken)
    n, nb = int(n), int(nb)
    if nb and args.fail_on_broken:
        raise ImageNetCError(f'{nb} unreadable images, e.g. {ds.samples[sorted(broken_all)[0]][0]}')
    if n == 0:
        raise ImageNetCError(f'{desc}: no readable image ({nb} unreadable)')
    wall = seconds / dd.world_size  # mean over ranks of the per-rank wall time
    return {
        'images': n, 'skipped': nb, 'skipped_files': [ds.samples[i][0] for i in sorted(broken_all)[:20]],
        'top1_acc': 100.0 * top1 / n, 'top5_acc': 100.0 * top5 / n, 'top1_err': 100.0 * (1 - top1 / n),
        'top5_err': 100.0 * (1 - top5 / n), 'seconds': round(wall, 3),
        'images_per_s': round((n + nb) / wall, 1) if wall > 0 else None,
    }


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)  # an interrupted run never leaves a half-written cell behind


def _load_cells(cell_dir: Path, fp: Dict[str, Any], overwrite: bool, rank: int) -> Dict[str, Dict[str, Any]]:
    done: Dict[str, Dict[str, Any]] = {}
    if not cell_dir.is_dir():
        return done
    for f in sorted(cell_dir.glob('*.json')):
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue  # treated as unfinished
        if rec.get('fingerprint') != fp:
            if overwrite:
                if rank == 0:
                    f.unlink(missing_ok=True)
                continue
            old = rec.get('fingerprint') or {}
            diff = sorted(k for k in set(fp) | set(old) if fp.get(k) != old.get(k))
            raise ImageNetCError(f'{cell_dir} holds results of other settings (differs in: {", ".join(diff)}); use '
                                 f'another --output or --overwrite')
        done[f.stem] = rec
    return done


def format_table(rows: List[Dict[str, Any]], summary: Dict[str, Any]) -> str:
    """Console table: one line per corruption (top-1 error per severity, mean, CE) and the summary lines."""
    sev = sorted({r['severity'] for r in rows})
    head = f'{"corruption":<18}' + ''.join(f'{"s" + str(s):>7}' for s in sev) + f'{"mean":>8}{"CE":>8}'
    lines = [head, '-' * len(head)]
    m = summary['metrics']
    for c in [c for c in ALL_CORRUPTIONS if any(r['corruption'] == c for r in rows)]:
        by_s = {r['severity']: r['top1_err'] for r in rows if r['corruption'] == c}
        ce = m['ce'].get(c)
        lines.append(f'{c:<18}' + ''.join(f'{by_s[s]:7.2f}' if s in by_s else f'{"-":>7}' for s in sev) +
                     f'{m["mean_error"][c]:8.2f}' + (f'{ce:8.2f}' if ce is not None else f'{"-":>8}'))
    lines.append('-' * len(head))

    def fmt(v: Optional[float]) -> str:
        return 'n/a' if v is None else f'{v:.2f}'
    lines.append(f'mCE {fmt(m["mce"])}  relative mCE {fmt(m["relative_mce"])}  clean err {fmt(m["clean_error"])}  '
                 f'mean corruption acc {fmt(m["mean_corruption_accuracy"])} (15: '
                 f'{fmt(m["mean_corruption_accuracy_15"])})' + ('' if m['complete'] else
                 f'  [incomplete: mCE over {len(m["ce"])} corruptions = {fmt(m["mce_partial"])}]'))
    lines.append(f'protocol: {summary["protocol_description"]}; {summary["images_per_s"]} images/s; '
                 f'{summary["skipped"]} unreadable images skipped')
    if (summary.get('clean') or {}).get('images'):
        lines.append(f'clean images: {summary["clean_transform"]}')
    return '\n'.join(lines)


def plot_ce(summaries: Sequence[Dict[str, Any]], labels: Sequence[str], path: Path) -> Path:
    """Grouped bar chart of CE per corruption (+ mCE) for any number of summary dicts; PNG via the Agg backend."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    names = [c for c in ALL_CORRUPTIONS if any(c in (s['metrics'].get('ce') or {}) for s in summaries)]
    if not names:
        raise ImageNetCError('no CE to plot (CE needs all 5 severities of a standard corruption)')
    cats = names + ['mCE']
    width = 0.8 / max(1, len(summaries))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.6 * len(cats) * max(1, len(summaries)) ** 0.5), 4.5))
    for i, (s, lab) in enumerate(zip(summaries, labels)):
        m = s['metrics']
        vals = [m['ce'].get(c, math.nan) for c in names] + [m['mce'] if m['mce'] is not None else math.nan]
        xs = [j + (i - (len(summaries) - 1) / 2) * width for j in range(len(cats))]
        ax.bar(xs, vals, width=width, label=lab)
    ax.axhline(100.0, color='k', lw=0.8, ls='--')
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats, rotation=60, ha='right', fontsize=8)
    ax.set_ylabel('CE (%, AlexNet = 100)')
    ax.set_title('ImageNet-C corruption error')
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _label(summary: Dict[str, Any], fallback: str) -> str:
    return f'{summary.get("model") or fallback} ({summary.get("protocol", "?")})'


# -------------------------------------------------------------------------------------------------------------- main
def _create_model(args: argparse.Namespace, num_classes: int, dd: Distributed) -> torch.nn.Module:
    if not timm.is_model(args.model.split('.')[0]):
        raise ImageNetCError(f'unknown model {args.model!r} (see vitzoo.utils.list_models() / timm.list_models())')
    torch.manual_seed(args.seed)  # identical random init on every rank when no weights are given
    try:
        model = create_model_with_weights(args.model, args.checkpoint, args.pretrained, num_classes, args.model_kwargs)
    except (RuntimeError, ValueError, KeyError) as e:  # incl. CheckpointError; timm's size-mismatch RuntimeError
        if not (args.checkpoint or args.pretrained):
            raise
        raise ImageNetCError(f'cannot load the weights ({args.checkpoint or "pretrained"}) into {args.model} with '
                             f'{num_classes} classes: {str(e)[:500]}') from e
    model.eval().to(dd.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _check_classes(classes: List[str], reference: List[str], where: str, num_classes: int) -> None:
    if classes != reference:
        extra, missing = sorted(set(classes) - set(reference)), sorted(set(reference) - set(classes))
        raise ImageNetCError(f'class folders of {where} differ from the reference classes (extra: {extra[:5]}, '
                             f'missing: {missing[:5]}, {len(classes)} vs {len(reference)})')
    if len(classes) != num_classes:
        raise ImageNetCError(f'{where} has {len(classes)} class folders ({", ".join(classes[:5])}...) but the model '
                             f'has {num_classes} classes: the folder set does not match the model\'s classes '
                             f'(--num-classes)')


def evaluate(args: argparse.Namespace, dd: Distributed) -> Dict[str, Any]:
    """Run the requested mode; returns the summary dict (also written to --output on rank 0)."""
    out = Path(args.output) if args.output else None
    if args.generate_from and args.subset != 'imagenet-c':
        raise ImageNetCError('--generate-from works with --subset imagenet-c only')
    if args.write and not args.generate_from:
        raise ImageNetCError('--write needs --generate-from (the clean ImageFolder to corrupt)')
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise ImageNetCError(f'checkpoint not found: {args.checkpoint}')
    bad_s = [s for s in args.severities if s not in SEVERITIES]
    if bad_s:
        raise ImageNetCError(f'severities must be in {list(SEVERITIES)}, got {bad_s}')
    severities = sorted(set(args.severities))
    cfg = timm.get_pretrained_cfg(args.model) if args.model and timm.is_model(args.model.split('.')[0]) else None
    crop = args.img_size or (cfg.input_size[-1] if cfg is not None else 224)
    resize = args.resize or int(round(crop * 256 / 224))
    if resize < crop:
        raise ImageNetCError(f'--resize {resize} is smaller than the crop {crop}')
    mean = tuple(cfg.mean) if cfg is not None and cfg.mean else IMAGENET_DEFAULT_MEAN
    std = tuple(cfg.std) if cfg is not None and cfg.std else IMAGENET_DEFAULT_STD
    # clean / -A / -R: the model's own eval transform (its cfg, as the official evaluations use it) unless overridden
    pct = args.crop_pct if args.crop_pct is not None else ((cfg.crop_pct if cfg is not None else None) or 0.875)
    clean_tf, clean_desc = model_eval_transform(
        crop, pct, args.crop_mode or (cfg.crop_mode if cfg is not None and cfg.crop_mode else 'center'),
        args.interpolation or (cfg.interpolation if cfg is not None and cfg.interpolation else 'bilinear'),
        mean, std, resize=args.resize)
    augmix_interp = args.interpolation or 'bilinear'  # augmix imagenet.py: transforms.Resize(256), PIL bilinear
    tfs = _imagenet_c_transforms(crop, resize, mean, std, augmix_interp)
    shape = (3, crop, crop)
    res: Dict[str, Any] = {'model': args.model or None, 'checkpoint': args.checkpoint or None, 'img_size': crop,
                           'resize': resize, 'mean': list(mean), 'std': list(std), 'clean_transform': clean_desc}

    # ---- write an ImageNet-C tree
    if args.write:
        corruptions = _corruption_list(args, None)
        t0 = time.perf_counter()
        w = write_imagenet_c(args.generate_from, args.write, corruptions, severities, seed=args.seed, resize=resize,
                             crop=crop, workers=args.workers, rank=dd.rank, world_size=dd.world_size,
                             progress=not args.no_progress and dd.rank == 0)
        dd.barrier()
        written, existing = (int(v) for v in dd.sum([w['written'], w['existing']]))
        res['write'] = {'root': str(Path(args.write).absolute()), 'written': written, 'existing': existing,
                        'seconds': round(time.perf_counter() - t0, 2), **w['params']}
        if dd.rank == 0:
            _logger.info(f'ImageNet-C tree {args.write}: {written} images written, {existing} kept '
                         f'({len(corruptions)} corruptions x {len(severities)} severities)')
        if not args.model:
            return res
        args.data_dir = args.write
    if not args.model:
        raise ImageNetCError('--model is required (except for --write / --compare)')
    if not args.data_dir and not args.generate_from:
        raise ImageNetCError('--data-dir (ImageNet-C root / ImageNet-A/-R folder) or --generate-from is required')

    # ---- ImageNet-A / -R
    if args.subset != 'imagenet-c':
        wnids, idx1k = imagenet_subset_info(args.subset)
        classes, samples = scan_image_folder(args.data_dir, what=f'{args.subset} folder')
        unknown = [c for c in classes if c not in wnids]
        if unknown:
            raise ImageNetCError(f'{args.data_dir}: class folders {unknown[:5]} are not among the 200 {args.subset} '
                                 f'wnids')
        num_classes = args.num_classes or 1000
        if num_classes != 1000:
            raise ImageNetCError(f'{args.subset} needs a 1000-class ImageNet model (the logits are masked to 200 '
                                 f'classes), got --num-classes {num_classes}')
        model = _create_model(args, num_classes, dd)
        ds = ImageListDataset(samples, clean_tf, shape, label_map=[wnids.index(c) for c in classes])
        r = _evaluate_loader(model, ds, args, dd, torch.tensor(idx1k, device=dd.device), desc=args.subset)
        res.update(subset=args.subset, protocol='model', protocol_description=clean_desc,
                   classes_present=len(classes), **r)
        if out is not None and dd.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            _write_json(out / 'summary.json', res)
        return res

    # ---- ImageNet-C cells
    on_the_fly = bool(args.generate_from) and not args.write
    if on_the_fly:
        src_classes, src_samples = scan_image_folder(args.generate_from, what='source image folder')
        corruptions = _corruption_list(args, None)
        reference = src_classes
    else:
        corruptions = _corruption_list(args, Path(args.data_dir))
        reference = None
    clean_dir = args.clean_dir or (args.generate_from if args.generate_from and not args.no_clean and
                                   args.clean_error is None else '')
    # validate the whole tree before building the model: structural errors fail fast
    cells: Dict[str, Tuple[str, int, List[Tuple[str, int]]]] = {}
    for c in corruptions:
        for s in severities:
            if on_the_fly:
                cells[f'{c}_{s}'] = (c, s, src_samples)
                continue
            classes, samples = imagenet_c_cell(args.data_dir, c, s)
            if reference is None:
                reference = classes
            _check_classes(classes, reference, f'{Path(args.data_dir) / c / str(s)}', len(reference))
            cells[f'{c}_{s}'] = (c, s, samples)
    clean = None
    if clean_dir:
        clean = scan_image_folder(clean_dir, what='clean image folder')
        _check_classes(clean[0], reference, f'clean folder {clean_dir}', len(reference))
    num_classes = args.num_classes or len(reference)
    _check_classes(reference, reference, 'the data' if on_the_fly else f'{args.data_dir}', num_classes)
    if args.protocol == 'crop' and not on_the_fly:
        size = _first_size(next(iter(cells.values()))[2])
        if size is not None and min(size) < crop:
            raise ImageNetCError(f'images are {size[0]}x{size[1]}, smaller than the crop {crop}: use --img-size '
                                 f'{min(size)} or --protocol resize')

    desc = PROTOCOLS[args.protocol].replace('(C)', f'({crop})').replace('(R)', f'({resize}, {augmix_interp})')
    fp = _fingerprint(args, crop, resize, num_classes, transforms=(desc, clean_desc))
    cell_dir = out / 'cells' if out is not None else None
    done = _load_cells(cell_dir, fp, args.overwrite, dd.rank) if cell_dir is not None else {}
    dd.barrier()  # rank 0 may have deleted stale cells (--overwrite)
    if cell_dir is not None and dd.rank == 0:
        cell_dir.mkdir(parents=True, exist_ok=True)
    model = _create_model(args, num_classes, dd)

    reused = evaluated = 0
    if clean is not None:
        if 'clean' in done and done['clean'].get('clean_dir') == str(Path(clean_dir).absolute()):
            res['clean'] = done['clean']['result']
        else:
            res['clean'] = _evaluate_loader(model, ImageListDataset(clean[1], clean_tf, shape), args, dd,
                                            desc='clean')
            if cell_dir is not None and dd.rank == 0:
                _write_json(cell_dir / 'clean.json', {'fingerprint': fp, 'result': res['clean'],
                                                      'clean_dir': str(Path(clean_dir).absolute())})
        clean_error = res['clean']['top1_err'] / 100.0
    elif args.clean_error is not None:
        if not 0.0 <= args.clean_error <= 100.0:
            raise ImageNetCError(f'--clean-error is a percentage in [0, 100], got {args.clean_error}')
        clean_error = args.clean_error / 100.0
        res['clean'] = {'top1_err': args.clean_error, 'source': '--clean-error'}
    else:
        clean_error = None

    rows: List[Dict[str, Any]] = []
    tf = tfs['crop'] if args.protocol == 'crop' else tfs['resize']
    total_imgs = total_s = 0.0
    for key, (c, s, samples) in cells.items():
        if key in done:
            r = done[key]['result']
            reused += 1
        else:
            if on_the_fly:
                ds = CorruptedImageDataset(samples, tf, shape, c, s, seed=args.seed, resize=resize, crop=crop)
            else:
                ds = ImageListDataset(samples, tf, shape)
            r = _evaluate_loader(model, ds, args, dd, desc=f'{c} s{s}')
            evaluated += 1
            if cell_dir is not None and dd.rank == 0:
                _write_json(cell_dir / f'{key}.json', {'fingerprint': fp, 'corruption': c, 'severity': s,
                                                       'result': r})
            total_imgs += r['images'] + r['skipped']
            total_s += r['seconds']
            if r['skipped'] and dd.rank == 0:
                _logger.warning(f'{c} s{s}: {r["skipped"]} unreadable images skipped, e.g. {r["skipped_files"][0]}')
        rows.append({'corruption': c, 'group': CORRUPTION_GROUPS[c], 'severity': s, **r})

    errors: Dict[str, Dict[int, float]] = {}
    for r in rows:
        errors.setdefault(r['corruption'], {})[r['severity']] = r['top1_err'] / 100.0
    metrics = imagenet_c_summary(errors, clean_error, args.alexnet_clean_error / 100.0, severities=SEVERITIES)
    if on_the_fly:
        desc += (f'; corrupted on the fly from {args.generate_from} (Resize({resize}) -> CenterCrop({crop}) -> '
                 f'corrupt -> JPEG q85, seed {args.seed})')
    res.update(
        subset='imagenet-c', protocol=args.protocol, protocol_description=desc,
        data=str(Path(args.generate_from if on_the_fly else args.data_dir).absolute()), source=fp['source'],
        corruptions=corruptions, severities=severities, num_classes=num_classes, metrics=metrics,
        cells_evaluated=evaluated, cells_reused=reused, skipped=sum(r['skipped'] for r in rows),
        images_per_s=round(total_imgs / total_s, 1) if total_s > 0 else None, world_size=dd.world_size,
        fingerprint=fp, rows=rows)
    if out is not None and dd.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / 'results.csv', 'w', newline='') as f:
            wr = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction='ignore')
            wr.writeheader()
            for r in rows:
                wr.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
        _write_json(out / 'summary.json', res)
        if metrics['ce']:
            plot_ce([res], [_label(res, 'model')], out / 'ce.png')
    return res


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Parse ``argv``, run, print the table; returns the summary dict (also written to --output)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    if args.compare:
        if not args.output:
            raise SystemExit('error: --compare needs --output DIR')
        sums, labels = [], []
        for p in args.compare:
            try:
                sums.append(json.loads(Path(p).read_text()))
            except (OSError, ValueError) as e:
                raise SystemExit(f'error: cannot read {p}: {e}')
            if 'metrics' not in sums[-1]:
                raise SystemExit(f'error: {p} is not an eval_imagenet_c summary.json (no "metrics")')
            labels.append(_label(sums[-1], Path(p).parent.name))
        try:
            path = plot_ce(sums, labels, Path(args.output) / 'ce_compare.png')
        except ImageNetCError as e:
            raise SystemExit(f'error: {e}')
        print(f'CE comparison written to {path}')
        return {'compare': list(args.compare), 'png': str(path)}
    try:
        dd = Distributed(args.device)
    except DistributedError as e:
        raise SystemExit(f'error: {e}')
    try:
        res = evaluate(args, dd)
    except (ImageNetCError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f'error: {e}')
    finally:
        dd.close()
    if dd.rank == 0:
        if 'metrics' in res:
            print(format_table(res['rows'], res))
        elif 'top1_acc' in res:
            print(f'{res["subset"]}: top-1 acc {res["top1_acc"]:.2f}  top-5 acc {res["top5_acc"]:.2f}  '
                  f'({res["images"]} images, {res["skipped"]} skipped; {res["protocol_description"]}; '
                  f'{res["images_per_s"]} images/s)')
        if args.output:
            print(f'results written to {args.output}')
    return res


if __name__ == '__main__':
    main()
