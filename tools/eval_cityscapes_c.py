#!/usr/bin/env python
"""Cityscapes-C: mIoU of an mmseg 1.x model under 16 corruptions of a Cityscapes-format val set.

python tools/eval_cityscapes_c.py CONFIG CHECKPOINT --data-root data/cityscapes [--work-dir DIR]
    [--corruptions gaussian_blur ...] [--severities 1 2 3 4 5] [--max-images N] [--cfg-options k=v ...]

Protocol (guoyongcs/TAPADL@6e4dbff ``TAPADL_FAN/segmentation/test_cityscapes_c.py``): 16 corruptions in 4 groups,
blur (gaussian, motion, glass, defocus), noise (gaussian, shot, speckle, impulse; severities 1-3 only), digital
(contrast, jpeg_compression, saturate, brightness), weather (snow, fog, frost, spatter); severities 1-5 otherwise.
Corrupted images are made as the official ``TAPADL_FAN/segmentation/tools/gen_city_c.py`` makes them: read with
``mmcv.imread`` (a BGR array), ``imagecorruptions.corrupt`` (1.1.2, with vitzoo's scikit-image / NumPy 2 shim) applied
to that BGR array, the uint8 result written with ``mmcv.imwrite`` under the source file's name (PNG: lossless). The
channel order matters: snow, frost, spatter and JPEG treat the channels differently, so RGB input gives other images.
They are cached under ``WORK_DIR/images/<corruption>/<severity>/``.
Deviation: the official script seeds ``np.random`` once (8) and draws every image from that one stream in the
(file-system dependent) ``mmcv.scandir`` order over all 19 corruptions; here each image is corrupted with ``np.random``
seeded from (seed, corruption, severity, image path), so the set is reproducible on any machine and independent of the
order or subset evaluated.
Outputs ``WORK_DIR/cityscapes_c.json`` and ``.csv``: mIoU per corruption and severity, per corruption (mean over its
severities), per group, the 16-corruption average and the clean mIoU.
"""
import argparse
import csv
import json
import os
import os.path as osp
import zlib
from typing import Dict, List, Sequence

try:
    import vitzoo  # noqa: F401  (registers the models)
except ModuleNotFoundError as e:  # the tools use the installed package
    raise SystemExit('vitzoo is not installed: `pip install -e .` in the vitzoo checkout') if e.name == 'vitzoo' else e

GROUPS = {
    'blur': ('gaussian_blur', 'motion_blur', 'glass_blur', 'defocus_blur'),
    'noise': ('gaussian_noise', 'shot_noise', 'speckle_noise', 'impulse_noise'),
    'digital': ('contrast', 'jpeg_compression', 'saturate', 'brightness'),
    'weather': ('snow', 'fog', 'frost', 'spatter'),
}
CORRUPTIONS = tuple(c for g in GROUPS.values() for c in g)
NOISE_MAX_SEVERITY = 3


def corruption_severities(name: str, severities: Sequence[int]) -> List[int]:
    """The severities evaluated for a corruption (noise stops at 3)."""
    return [s for s in severities if name not in GROUPS['noise'] or s <= NOISE_MAX_SEVERITY]


def _image_seed(seed: int, corruption: str, severity: int, rel_path: str) -> int:
    return zlib.crc32(f'{seed}/{corruption}/{severity}/{rel_path}'.encode()) & 0x7FFFFFFF


def make_corrupted(src_dir: str, dst_dir: str, corruption: str, severity: int, seed: int = 8,
                   suffix: str = '_leftImg8bit.png', max_images: int = 0) -> List[str]:
    """Write the corrupted copy of every ``*suffix`` image under ``src_dir`` (kept if already there), as the official
    ``gen_city_c.py``: BGR in (``mmcv.imread``), ``corrupt``, ``mmcv.imwrite``; ``np.random`` seeded per image.

    The corruption is :func:`vitzoo.data.imagenet_c.corrupt_image` (``imagecorruptions`` with vitzoo's scikit-image /
    NumPy 2 shim, which also seeds skimage's noise from ``np.random`` as the scikit-image of the official runs did)."""
    import mmcv
    from vitzoo.data.imagenet_c import corrupt_image
    files = sorted(osp.relpath(osp.join(r, f), src_dir) for r, _, fs in os.walk(src_dir) for f in fs
                   if f.endswith(suffix))
    if max_images:
        files = files[:max_images]
    for rel in files:
        out = osp.join(dst_dir, rel)
        if osp.isfile(out):
            continue
        os.makedirs(osp.dirname(out), exist_ok=True)
        img = mmcv.imread(osp.join(src_dir, rel))  # BGR, as the official script corrupts it
        img = corrupt_image(img, corruption, severity, np_seed=_image_seed(seed, corruption, severity, rel))
        mmcv.imwrite(img, out)
    return files


def parse_args(argv=None) -> argparse.Namespace:
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(description='Cityscapes-C evaluation (16 corruptions)')
    p.add_argument('config')
    p.add_argument('checkpoint')
    p.add_argument('--data-root', required=True, help='Cityscapes-format root (leftImg8bit/, gtFine/)')
    p.add_argument('--split', default='val')
    p.add_argument('--work-dir', default='work_dirs/cityscapes_c')
    p.add_argument('--corruptions', nargs='+', default=list(CORRUPTIONS), choices=CORRUPTIONS)
    p.add_argument('--severities', nargs='+', type=int, default=[1, 2, 3, 4, 5])
    p.add_argument('--seed', type=int, default=8)
    p.add_argument('--max-images', type=int, default=0, help='evaluate only the first N images (0: all)')
    p.add_argument('--no-clean', action='store_true', help='skip the clean evaluation')
    p.add_argument('--trust-checkpoint', action='store_true',
                   help='allow a full unpickle of CHECKPOINT if the weights-only load refuses it')
    p.add_argument('--cfg-options', nargs='+', action=DictAction)
    return p.parse_args(argv)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    import torch
    from mmengine.config import Config
    from mmengine.evaluator import Evaluator
    from mmengine.registry import DefaultScope
    from mmengine.runner import Runner
    import mmseg.utils
    import vitzoo.mmseg  # noqa: F401
    from vitzoo.mm import load_checkpoint_file

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    mmseg.utils.register_all_modules(init_default_scope=False)
    from mmseg.registry import MODELS
    os.makedirs(args.work_dir, exist_ok=True)
    cfg.model.get('backbone', {}).pop('pretrained', None)
    cfg.model.backbone['init_cfg'] = None
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(cfg.model)
    ckpt = load_checkpoint_file(args.checkpoint, trusted=args.trust_checkpoint)
    state_dict = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else ckpt
    model.load_state_dict(state_dict, strict=True)
    model.eval()

    gt_dir = osp.abspath(osp.join(args.data_root, 'gtFine', args.split))
    clean_dir = osp.abspath(osp.join(args.data_root, 'leftImg8bit', args.split))
    files = sorted(f for _, _, fs in os.walk(clean_dir) for f in fs if f.endswith('_leftImg8bit.png'))
    files = files[:args.max_images] if args.max_images else files

    def evaluate(img_dir: str) -> float:
        loader_cfg = dict(cfg.test_dataloader)
        dataset = dict(loader_cfg['dataset'])
        dataset.update(type='CityscapesDataset', data_root='', data_prefix=dict(img_path=img_dir, seg_map_path=gt_dir))
        if args.max_images:
            dataset['indices'] = args.max_images
        loader_cfg.update(dataset=dataset, num_workers=0, persistent_workers=False)
        with DefaultScope.overwrite_default_scope('mmseg'):
            loader = Runner.build_dataloader(loader_cfg)
            evaluator = Evaluator(dict(type='IoUMetric', iou_metrics=['mIoU']))
            evaluator.dataset_meta = loader.dataset.metainfo
            with torch.no_grad():
                for data in loader:
                    evaluator.process(data_samples=model.test_step(data), data_batch=data)
            return float(evaluator.evaluate(len(loader.dataset))['mIoU'])

    results: Dict = dict(config=args.config, checkpoint=args.checkpoint, images=len(files), seed=args.seed,
                         per_severity={}, per_corruption={}, per_group={})
    if not args.no_clean:
        results['clean'] = evaluate(clean_dir)
    rows = []
    for c in args.corruptions:
        sevs = corruption_severities(c, args.severities)
        results['per_severity'][c] = {}
        for s in sevs:
            dst = osp.abspath(osp.join(args.work_dir, 'images', c, str(s)))
            make_corrupted(clean_dir, dst, c, s, seed=args.seed, max_images=args.max_images)
            miou = evaluate(dst)
            results['per_severity'][c][str(s)] = miou
            rows.append(dict(corruption=c, severity=s, mIoU=miou))
            print(f'{c:18s} severity {s}: mIoU {miou:.2f}', flush=True)
        if sevs:
            results['per_corruption'][c] = sum(results['per_severity'][c].values()) / len(sevs)
    for g, names in GROUPS.items():
        vals = [results['per_corruption'][c] for c in names if c in results['per_corruption']]
        if vals:
            results['per_group'][g] = sum(vals) / len(vals)
    per_c = list(results['per_corruption'].values())
    results['average'] = sum(per_c) / len(per_c) if per_c else float('nan')
    with open(osp.join(args.work_dir, 'cityscapes_c.json'), 'w') as f:
        json.dump(results, f, indent=2)
    with open(osp.join(args.work_dir, 'cityscapes_c.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=['corruption', 'severity', 'mIoU'])
        w.writeheader()
        w.writerows(rows)
        for c, v in results['per_corruption'].items():
            w.writerow(dict(corruption=c, severity='mean', mIoU=v))
        w.writerow(dict(corruption='average', severity='mean', mIoU=results['average']))
        if 'clean' in results:
            w.writerow(dict(corruption='clean', severity='', mIoU=results['clean']))
    print(f"Cityscapes-C average mIoU over {len(per_c)} corruptions: {results['average']:.2f}"
          + (f" (clean {results['clean']:.2f})" if 'clean' in results else ''))
    return results


if __name__ == '__main__':
    main()
