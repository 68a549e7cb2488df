#!/usr/bin/env python
"""Train an mmdet 3.x / mmseg 1.x config with the stock mmengine Runner (vitzoo backbones registered).

Single process:  python tools/mm_train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--cfg-options k=v ...]
Many GPUs:       torchrun --nproc_per_node=8 tools/mm_train.py CONFIG --launcher pytorch

torch >= 2.6 loads checkpoints weights-only; mmengine 0.10.7 calls ``torch.load`` without ``weights_only`` and its
Runner checkpoints carry numpy scalars and message-hub buffers. While the Runner trains, mmengine's local checkpoint
loader is swapped (scoped, restored afterwards) for one that allow-lists those data types for that call and fully
unpickles only files inside this run's work_dir (checkpoints it wrote itself); anything else stays weights-only.
"""
import argparse

try:
    import vitzoo  # noqa: F401
except ModuleNotFoundError as e:  # the tools use the installed package
    raise SystemExit('vitzoo is not installed: `pip install -e .` in the vitzoo checkout') if e.name == 'vitzoo' else e
from vitzoo.mm import add_runner_args, build_runner, load_config, parse_runner_args, trusted_checkpoints


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description='Train a detector / segmentor (mmengine Runner)')
    p.add_argument('config', help='config file')
    p.add_argument('--resume', nargs='?', type=str, const='auto',
                   help='resume from this checkpoint, or (no value) from the latest one in the work_dir')
    p.add_argument('--amp', action='store_true', help='automatic mixed precision')
    p.add_argument('--auto-scale-lr', action='store_true', help='scale the lr by the actual batch size')
    add_runner_args(p, 'where logs and checkpoints go (default ./work_dirs/<config name>)')
    return parse_runner_args(p, argv)


def build_cfg(args: argparse.Namespace):
    cfg = load_config(args.config, args.launcher, args.cfg_options, args.work_dir)
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if args.auto_scale_lr:
        cfg.setdefault('auto_scale_lr', {})['enable'] = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    return cfg


def main(argv=None):
    args = parse_args(argv)
    cfg = build_cfg(args)
    runner = build_runner(cfg)
    with trusted_checkpoints(cfg.work_dir):
        runner.train()
    return runner


if __name__ == '__main__':
    main()
