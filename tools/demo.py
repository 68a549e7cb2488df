#!/usr/bin/env python3
"""vitzoo demo: generate the embedded shapes dataset, build every registered model and report on it.

For each model: parameters, GMACs ("GFLOPs" as the papers count them) at its default resolution, images/s of an
eval forward on this CPU, and whether the output on real demo images is finite. Results are printed as a table and
written to ``<output>/models.csv`` and ``<output>/models.json``.

Example:
    python tools/demo.py --output output/demo
    python tools/demo.py --model 'agent_deit_*' --no-throughput
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
import vitzoo
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

    names = list_models(args.model)
    if not names:
        print(f'no vitzoo model matches {args.model}', file=sys.stderr)
        return 2
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
    print(f'results: {out / "models.csv"}, {out / "models.json"} ({time.perf_counter() - t0:.0f}s total)')
    return 0 if all(r['finite'] for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main())
