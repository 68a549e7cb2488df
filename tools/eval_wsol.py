#!/usr/bin/env python3
"""Evaluate weakly supervised object localization (WSOL) of a vitzoo model with a localization map (SAT).

For every image: classify, take the model's localization map (``model.forward_loc``), turn it into a box (min-max
normalise -> bilinear upsampling to the crop -> threshold -> largest 8-connected component -> bbox) and compare it
with the GT boxes (+1-pixel IoU, best over an image's boxes). Reports, in percent: classification top-1 / top-5;
GT-known Loc, Top-1 Loc, Top-5 Loc and IoU>=0.3/0.5/0.7 at each --threshold; the real MaxBoxAccV2 (Choe et al.,
CVPR 2020: sweep of map thresholds, every contour box, IoU 0.3/0.5/0.7); and the trivial whole-crop-box baseline.

Datasets (any root folder, nothing hard-coded):
  cub       DATA/test/<class>/<img>, DATA/test_list.txt ("<class>/<img>;<label>"),
            DATA/test_bounding_box.txt ("x0 y0 x1 y1 h w" per image, in test_list order)
  imagenet  DATA/val/<wnid>/<img>, --box-file (default DATA/val_gt.txt: "<wnid>\\\\<img> W H ; x1 y1 x2 y2 ...")
  shapes    the embedded procedural dataset, written in the CUB layout to DATA first (no download)

Images go through SAT's eval transform: Resize((R, R)) -> CenterCrop(C), with C = --img-size (default: the model's
input size) and R = --resize-size (default C / crop_pct, 256 for 224); GT boxes are mapped into the crop as SAT does.

Protocol defaults are the official SAT evaluators' (wpy1999/SAT evaluator.py / evaluator_ImageNet.py), so the numbers
compare with the paper's: cub classifies with ten-crop (the mean softmax over TenCrop(C) of the R x R resize; the map
and box still come from the centre crop) and thresholds the map at 0.4; imagenet classifies the centre crop only and
thresholds at 0.3. shapes (no official protocol) uses the centre crop and 0.4. --tencrop / --no-tencrop and
--threshold override; the results record both.

Examples:
  python tools/eval_wsol.py --model sat_deit_small --checkpoint logs/CUB_200_2011/best_loc.pth.tar \\
      --dataset cub --data-dir /data/CUB_200_2011 --output out/sat_cub --save-overlays 16
  python tools/eval_wsol.py --model sat_deit_small --checkpoint best_loc.pth.tar --dataset imagenet \\
      --data-dir /data/imagenet --box-file Data/ILSVRC/val_gt.txt --threshold 0.3 -b 128
  python tools/eval_wsol.py --model sat_deit_tiny --checkpoint out/train/model_best.pth.tar --dataset shapes \\
      --data-dir data/shapes_cub --img-size 96 --shapes-img-size 96

Writes (with --output DIR): DIR/wsol_results.json, DIR/wsol_results.txt (the table), DIR/overlays/*.png.
"""
import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_pretrained_cfg

try:
    import vitzoo  # noqa: F401  (registers the models)
except ModuleNotFoundError as e:  # the tools use the installed package
    raise SystemExit('vitzoo is not installed: `pip install -e .` in the vitzoo checkout') if e.name == 'vitzoo' else e
from vitzoo.data.wsol import (WSOLDataError, WSOLDataset, cub_dataset, imagenet_dataset, write_shapes_cub,
                              wsol_eval_transform, wsol_tencrop_transform)
from vitzoo.utils import add_model_args, create_model_with_weights
from vitzoo.wsol import WSOLMeter

_logger = logging.getLogger('eval_wsol')

DEFAULT_THRESHOLDS = {'cub': [0.4], 'shapes': [0.4], 'imagenet': [0.3]}  # the SAT evaluators' values
DEFAULT_TENCROP = {'cub': True, 'shapes': False, 'imagenet': False}  # evaluator.py --tencrop True, _ImageNet.py False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='eval_wsol.py', description=__doc__[:__doc__.index('Datasets')].strip(),
        epilog=__doc__[__doc__.index('Datasets'):], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group('Dataset')
    g.add_argument('--data-dir', required=True, metavar='DIR', help='dataset root (see "Datasets" below)')
    g.add_argument('--dataset', default='cub', choices=('cub', 'imagenet', 'shapes'), help='layout (default: cub)')
    g.add_argument('--split', default=None, help='image folder / list prefix (default: test for cub/shapes, val '
                                                 'for imagenet)')
    g.add_argument('--box-file', default=None, metavar='FILE',
                   help='box file (default: DATA/<split>_bounding_box.txt for cub, DATA/val_gt.txt for imagenet)')
    g.add_argument('--list-file', default=None, metavar='FILE',
                   help='CUB image list (default: DATA/<split>_list.txt)')
    g.add_argument('--shapes-num-test', type=int, default=200, metavar='N', help='shapes: test images to write')
    g.add_argument('--shapes-num-train', type=int, default=0, metavar='N', help='shapes: train images to write')
    g.add_argument('--shapes-num-classes', type=int, default=10, metavar='K', help='shapes: classes')
    g.add_argument('--shapes-img-size', type=int, default=96, metavar='S', help='shapes: image size')
    g.add_argument('--shapes-seed', type=int, default=0, help='shapes: dataset seed')
    add_model_args(p.add_argument_group('Model'), 'sat_deit_small', model_help='registered model with forward_loc',
                   checkpoint_help='weights: an official SAT checkpoint ("module." keys), a vitzoo / timm train '
                                   'checkpoint or a state_dict (loaded through the model\'s checkpoint filter)',
                   num_classes_help='classifier classes (default: the class folders)')
    g = p.add_argument_group('Evaluation')
    g.add_argument('--img-size', type=int, default=None, metavar='C', help='eval crop C (default: the model cfg)')
    g.add_argument('--resize-size', type=int, default=None, metavar='R',
                   help='square resize before the centre crop (default: C / crop_pct of the model cfg)')
    g.add_argument('--threshold', type=float, nargs='+', default=None, metavar='T',
                   help='map thresholds for the box metrics (default: 0.4 cub/shapes, 0.3 imagenet); all are '
                        'reported, none is selected on the evaluated data')
    g.add_argument('--cam-curve-interval', type=float, default=0.01, metavar='D',
                   help='MaxBoxAccV2 threshold step (0 disables MaxBoxAccV2)')
    g.add_argument('--tencrop', action=argparse.BooleanOptionalAction, default=None,
                   help='classify with the mean softmax over TenCrop(C) of the resize; the map still comes from the '
                        'centre crop (default: on for cub, as SAT\'s evaluator.py; off for imagenet and shapes)')
    g.add_argument('-b', '--batch-size', type=int, default=64, metavar='N', help='batch size')
    g.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='data loading workers')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    g.add_argument('--limit', type=int, default=0, metavar='N', help='evaluate only the first N images (0: all)')
    g = p.add_argument_group('Output')
    g.add_argument('--output', default='', metavar='DIR', help='write wsol_results.json / .txt (and overlays) here')
    g.add_argument('--save-overlays', type=int, default=0, metavar='K',
                   help='save PNG overlays (map, predicted box green, GT boxes red) of the first K images')
    g.add_argument('--no-progress', action='store_true', help='no progress bar')
    return p


def build_dataset(args: argparse.Namespace, crop: int, resize: int, mean, std) -> WSOLDataset:
    kw = dict(transform=wsol_eval_transform(resize, crop, mean, std), resize_size=resize, crop_size=crop)
    if args.tencrop:
        kw['extra_transform'] = wsol_tencrop_transform(resize, crop, mean, std)
    if args.dataset == 'imagenet':
        return imagenet_dataset(args.data_dir, split=args.split or 'val', box_file=args.box_file, **kw)
    if args.dataset == 'shapes':
        write_shapes_cub(args.data_dir, num_train=args.shapes_num_train, num_test=args.shapes_num_test,
                         num_classes=args.shapes_num_classes, img_size=args.shapes_img_size, seed=args.shapes_seed,
                         progress=not args.no_progress)
    return cub_dataset(args.data_dir, split=args.split or 'test', list_file=args.list_file, box_file=args.box_file,
                       **kw)


def _jet(x: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 'jet' colours."""
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def save_overlay(path: Path, image, norm_map: np.ndarray, box: Sequence[float], gt_boxes: np.ndarray,
                 resize: int, crop: int) -> None:
    """The eval crop blended 50/50 with the jet map; predicted box green, GT boxes red."""
    from PIL import Image, ImageDraw
    img = image.resize((resize, resize), Image.BILINEAR)
    off = (resize - crop) // 2
    img = img.crop((off, off, off + crop, off + crop))
    heat = Image.fromarray(_jet(norm_map)).resize(img.size)
    out = Image.blend(img, heat, 0.5)
    draw = ImageDraw.Draw(out)
    width = max(1, crop // 112)
    for g in gt_boxes:
        draw.rectangle([float(g[0]), float(g[1]), float(g[2]), float(g[3])], outline=(255, 0, 0), width=width)
    x0, y0, x1, y1 = (float(v) for v in box)
    draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(0, 255, 0), width=width)
    out.save(path)


def format_table(res: Dict[str, Any]) -> str:
    cols = ['GT-known', 'Top-1 Loc', 'Top-5 Loc', 'IoU30', 'IoU50', 'IoU70', 'mean IoU']
    cls = 'ten-crop' if res.get('tencrop') else 'centre crop'
    lines = [f'images: {res["num_images"]}   cls top-1: {res["top1"]:.2f}   cls top-5: {res["top5"]:.2f} ({cls})', '',
             f'{"box":<18}' + ''.join(f'{c:>11}' for c in cols)]

    def row(name: str, m: Dict[str, float]) -> str:
        vals = [m.get('gt_known'), m.get('top1_loc'), m.get('top5_loc'), m.get('iou30'), m.get('iou50'),
                m.get('iou70'), 100 * m['mean_iou']]
        return f'{name:<18}' + ''.join(f'{v:>11.2f}' if v is not None else f'{"-":>11}' for v in vals)

    for t, m in res['loc'].items():
        lines.append(row(f'map > {float(t):g}', m))
    lines.append(row('full image', res['baseline']))
    if 'maxboxacc_v2' in res:
        mb = res['maxboxacc']
        lines += ['', 'MaxBoxAccV2: {:.2f}   ('.format(res['maxboxacc_v2']) + ', '.join(
            f'IoU{k[3:]} {v["maxboxacc"]:.2f} @ tau {v["best_cam_threshold"]:.2f}' for k, v in mb.items()) + ')']
    return '\n'.join(lines)


def evaluate(args: argparse.Namespace) -> Dict[str, Any]:
    device = torch.device(args.device)
    if not timm.is_model(args.model.split('.')[0]):
        raise SystemExit(f'unknown model {args.model!r} (vitzoo localization models: sat_deit_tiny / small / base)')
    if args.tencrop is None:  # the official protocol of the dataset
        args.tencrop = DEFAULT_TENCROP[args.dataset]
    cfg = get_pretrained_cfg(args.model)
    crop = args.img_size or (cfg.input_size[-1] if cfg else 224)
    resize = args.resize_size or int(round(crop / ((cfg.crop_pct if cfg else None) or 0.875)))
    if resize < crop:
        raise SystemExit(f'--resize-size {resize} is smaller than the crop {crop}')
    mean = cfg.mean if cfg else IMAGENET_DEFAULT_MEAN
    std = cfg.std if cfg else IMAGENET_DEFAULT_STD
    ds = build_dataset(args, crop, resize, mean, std)  # first: bad data files fail before any model is built

    num_classes = args.num_classes or len(ds.classes)
    if len(ds.classes) > num_classes:
        raise SystemExit(f'the dataset has {len(ds.classes)} classes but the model only {num_classes}')
    model = create_model_with_weights(args.model, args.checkpoint, args.pretrained, num_classes, args.model_kwargs)
    if not hasattr(model, 'forward_loc'):
        raise SystemExit(f'{args.model} has no forward_loc(): not a localization model (try sat_deit_small)')
    model.eval().to(device)

    indices = list(range(len(ds) if not args.limit else min(args.limit, len(ds))))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ds, indices), batch_size=args.batch_size, shuffle=False, num_workers=args.workers)

    thresholds = args.threshold or DEFAULT_THRESHOLDS[args.dataset]
    meter = WSOLMeter(thresholds=thresholds, cam_curve_interval=args.cam_curve_interval, crop_size=crop)
    overlay_dir = None
    if args.save_overlays > 0:
        if not args.output:
            raise SystemExit('--save-overlays needs --output')
        overlay_dir = Path(args.output) / 'overlays'
        overlay_dir.mkdir(parents=True, exist_ok=True)

    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(indices), desc=f'eval_wsol {args.model}', unit='img')
    start = time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            x, labels, idx = batch[0].to(device), batch[1], batch[2]
            logits, loc_map = model.forward_loc(x)
            if args.tencrop:
                crops = batch[3].to(device)  # B, 10, 3, C, C
                B = crops.shape[0]
                logits = F.softmax(model(crops.flatten(0, 1)), dim=-1).reshape(B, 10, -1).mean(dim=1)
            gts = [ds.gt_boxes[i] for i in idx.tolist()]
            out = meter.update(loc_map.float().cpu(), gts, logits.float().cpu(), labels)
            if overlay_dir is not None:
                for j, i in enumerate(idx.tolist()):
                    if i >= args.save_overlays:
                        break
                    name = Path(ds.records[i].path).stem
                    save_overlay(overlay_dir / f'{i:05d}_{name}.png', ds.load(i), out['maps'][j].numpy(),
                                 out['boxes'][0, j], gts[j], resize, crop)
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    res = meter.compute()
    res['loc'] = {f'{t:g}': v for t, v in res['loc'].items()}
    res.update(model=args.model, checkpoint=args.checkpoint or None, dataset=args.dataset,
               data_dir=str(args.data_dir), crop_size=crop, resize_size=resize, thresholds=thresholds,
               tencrop=args.tencrop, seconds=round(time.perf_counter() - start, 2))
    return res


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Parse ``argv``, evaluate, print the table; returns the results dict (also written to --output)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        res = evaluate(args)
    except (WSOLDataError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f'error: {e}')
    table = format_table(res)
    print(table)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / 'wsol_results.json').write_text(json.dumps(res, indent=1))
        (out / 'wsol_results.txt').write_text(table + '\n')
        print(f'results written to {out / "wsol_results.json"}')
    print('--result')
    print(json.dumps({k: res[k] for k in ('top1', 'top5', 'loc', 'baseline', 'maxboxacc_v2') if k in res}, indent=1))
    return res


if __name__ == '__main__':
    main()
