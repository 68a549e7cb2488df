#!/usr/bin/env python3
"""vitzoo demo: the whole zoo on the embedded shapes dataset, on a CPU, in about ten minutes.

1. Generate the embedded procedural dataset and build every registered model: a table of parameters, GMACs ("GFLOPs"
   as the papers count them) at its default resolution, images/s of an eval forward, and whether the output on real
   demo images is finite (``<output>/models.csv`` / ``.json``).
2. Train three small models with ``tools/train.py`` on a 4-class, 32 px version of the data: an Agent-DeiT, its plain
   softmax DeiT counterpart (same width/depth), and a TAP-RVT trained with the attention diversification loss.
3. Write "ShapesNet-C" (the ImageNet-C protocol applied to the validation images: 15 corruptions x 5 severities) and
   evaluate all three with ``tools/eval_imagenet_c.py``: clean top-1, mCE, relative mCE, and a CE bar chart.

Example:
    python tools/demo.py --output output/demo
    python tools/demo.py --skip-train --model 'agent_deit_*' --no-throughput   # the model table only
"""
import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

import timm

try:
    import vitzoo
except ModuleNotFoundError as e:  # the tools use the installed package
    raise SystemExit('vitzoo is not installed: `pip install -e .` in the vitzoo checkout') if e.name == 'vitzoo' else e
from vitzoo.data.shapes import write_image_folder
from vitzoo.utils import count_macs, count_params, list_models, measure_throughput


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--output', default='output/demo', help='folder for the dataset and result files')
    p.add_argument('--model', nargs='*', default=['*'], help='model name patterns (fnmatch), default: all')
    p.add_argument('--num-train', type=int, default=200, help='demo training images to generate')
    p.add_argument('--num-val', type=int, default=50, help='demo validation images to generate')
    p.add_argument('--num-classes', type=int, default=10, help='classes of the demo dataset')
    p.add_argument('--img-size', type=int, default=96, help='size of the generated demo images')
    p.add_argument('-b', '--batch-size', type=int, default=2, help='batch size for the throughput measurement')
    p.add_argument('--min-time', type=float, default=1.0, help='seconds per throughput measurement')
    p.add_argument('--no-throughput', action='store_true', help='skip the images/s measurement')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0 = leave the default)')
    p.add_argument('--skip-table', action='store_true', help='skip step 1 (the model table)')
    p.add_argument('--skip-train', action='store_true', help='skip steps 2-3 (training and ShapesNet-C)')
    p.add_argument('--epochs', type=int, default=20, help='training epochs per demo model')
    return p.parse_args(argv)


def demo_batch(root: Path, size: int, n: int = 2) -> torch.Tensor:
    """The first ``n`` validation images, resized to ``size`` and normalised with ImageNet statistics."""
    files = sorted((root / 'val').rglob('*.png'))[:n]
    mean = torch.tensor(timm.data.IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(timm.data.IMAGENET_DEFAULT_STD).view(3, 1, 1)
    imgs = []
    for f in files:
        img = Image.open(f).convert('RGB').resize((size, size), Image.BICUBIC)
        t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
        imgs.append((t.float() / 255 - mean) / std)
    return torch.stack(imgs)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    print(f'vitzoo {vitzoo.__version__} | torch {torch.__version__} | timm {timm.__version__} | '
          f'{torch.get_num_threads()} threads')
    t0 = time.perf_counter()
    data_root = write_image_folder(out / 'shapes', num_train=args.num_train, num_val=args.num_val,
                                   num_classes=args.num_classes, img_size=args.img_size, seed=0)
    print(f'demo data: {data_root} ({args.num_train} train / {args.num_val} val, {args.num_classes} classes, '
          f'{args.img_size}px) in {time.perf_counter() - t0:.1f}s')

    ok = True
    if not args.skip_table:
        ok = model_table(args, out, data_root)
    if not args.skip_train:
        train_and_evaluate(args, out)
    print(f'done in {time.perf_counter() - t0:.0f}s')
    return 0 if ok else 1


def model_table(args: argparse.Namespace, out: Path, data_root: Path) -> bool:
    """Step 1: build every selected model, count params / GMACs, time it, check finiteness on demo images."""
    names = list_models(args.model)
    if not names:
        print(f'no vitzoo model matches {args.model}', file=sys.stderr)
        return False
    rows = []
    header = f"{'model':<26}{'params(M)':>10}{'GFLOPs':>9}{'res':>6}{'img/s':>9}  finite"
    print(header)
    print('-' * len(header))
    for name in names:
        model = timm.create_model(name).eval()
        size = model.pretrained_cfg['input_size']
        row = dict(model=name, params_m=round(count_params(model) / 1e6, 2),
                   gflops=round(count_macs(model, size) / 1e9, 2), resolution=size[-1])
        with torch.no_grad():
            y = model(demo_batch(data_root, size[-1]))
        row['finite'] = bool(torch.isfinite(y).all())
        row['img_per_s'] = None if args.no_throughput else round(
            measure_throughput(model, size, batch_size=args.batch_size, min_time=args.min_time), 2)
        rows.append(row)
        ips = '-' if row['img_per_s'] is None else f"{row['img_per_s']:.1f}"
        print(f"{name:<26}{row['params_m']:>10.2f}{row['gflops']:>9.2f}{row['resolution']:>6}{ips:>9}  "
              f"{'yes' if row['finite'] else 'NO'}", flush=True)
        del model
    with open(out / 'models.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / 'models.json').write_text(json.dumps(rows, indent=2))
    print(f'results: {out / "models.csv"}, {out / "models.json"}')
    return all(r['finite'] for r in rows)


# The three demo runs: same tiny width/depth (64 wide, 3 blocks, 32 px inputs, patch 4).
DEMO_RUNS = {
    'agent_deit': ['-c', 'configs/train/demo_agent_deit.yaml'],
    'deit (softmax)': ['-c', 'configs/train/demo_agent_deit.yaml', '--model', 'deit_tiny_patch16_224',
                       '--model-kwargs', 'patch_size=4', 'embed_dim=64', 'depth=3', 'num_heads=2', "global_pool='avg'"],
    'tap_rvt + ADL': ['-c', 'configs/train/demo_agent_deit.yaml', '--model', 'tap_rvt_tiny', '--model-kwargs',
                      'patch_size=4', 'base_dims=[32]', 'depth=[3]', 'heads=[2]', '--method', 'adl',
                      '--adl-threshold', '0.5'],
}


def _load_tool(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f'{name}.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def train_and_evaluate(args: argparse.Namespace, out: Path) -> None:
    """Steps 2-3: train the demo models, write ShapesNet-C, evaluate corruption robustness, plot CE."""
    train, evalc = _load_tool('train'), _load_tool('eval_imagenet_c')
    data_dir = out / 'shapes4'
    results = {}
    for label, argv in DEMO_RUNS.items():
        slug = label.split()[0]
        print(f'\n== training {label} ==', flush=True)
        res = train.main(argv + ['--data-dir', str(data_dir), '--output', str(out / 'train'), '--experiment', slug,
                                 '--epochs', str(args.epochs)])
        results[label] = dict(train=res, slug=slug, argv=argv)
    summaries = []
    for label, r in results.items():
        print(f'\n== ShapesNet-C: {label} ==', flush=True)
        model_args = r['argv'][r['argv'].index('--model'):] if '--model' in r['argv'] else []
        model_args = [a for a in model_args if a not in ('--method', 'adl', '--adl-threshold', '0.5')]
        cfg_model = ['--model', 'agent_deit_tiny', '--model-kwargs', 'patch_size=4', 'embed_dim=64', 'depth=3',
                     'num_heads=2', 'agent_num=16', "global_pool='avg'"]
        model_args = model_args or cfg_model
        i = model_args.index('--model-kwargs') + 1
        model_args = model_args[:i] + ['img_size=32'] + model_args[i:]  # build at the trained resolution
        summary = evalc.main([
            '--generate-from', str(data_dir / 'val'), '--write', str(out / 'shapesnet_c'),
            '--img-size', '32', '--resize', '32', '--num-classes', '4', '-j', '0', '--no-progress',
            '--checkpoint', str(Path(r['train']['output_dir']) / 'best.pth'),
            '--output', str(out / 'robustness' / r['slug'])] + model_args)
        r['summary'] = summary
        summaries.append(str(out / 'robustness' / r['slug'] / 'summary.json'))
    evalc.main(['--compare', *summaries, '--output', str(out / 'robustness')])
    print('\n## demo results (4 classes, 32 px; chance = 25% top-1)')
    print(f"{'model':<18}{'val top-1':>10}{'clean err':>10}{'mCE':>8}{'rel. mCE':>10}{'mean corr. acc':>16}")
    for label, r in results.items():
        m = r['summary'].get('metrics', {})
        clean = r['summary'].get('clean', {}).get('top1_err')
        print(f"{label:<18}{r['train'].get('eval_top1', float('nan')):>10.1f}{_num(clean):>10}{_num(m.get('mce')):>8}"
              f"{_num(m.get('relative_mce')):>10}{_num(m.get('mean_corruption_accuracy_15')):>16}")
    print(f"chart: {out / 'robustness'}")


def _num(v, scale: float = 1.0) -> str:
    return '-' if v is None else f'{v * scale:.1f}'


if __name__ == '__main__':
    sys.exit(main())
