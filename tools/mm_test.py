#!/usr/bin/env python
"""Evaluate a checkpoint of an mmdet 3.x / mmseg 1.x config with the stock mmengine Runner.

python tools/mm_test.py CONFIG CHECKPOINT [--work-dir DIR] [--out results.pkl] [--cfg-options k=v ...]
torchrun --nproc_per_node=8 tools/mm_test.py CONFIG CHECKPOINT --launcher pytorch

Checkpoints are read weights-only with numpy scalars / dtypes and mmengine's HistoryBuffer allow-listed (enough for
Runner checkpoints and plain state_dicts). A file needing more is refused unless it lies in the work_dir or
``--trust-checkpoint`` is given (only for files you produced yourself); nothing is changed globally.

CHECKPOINT may also be a released official one (LeapLabTHU/Agent-Attention ``downstream/detection`` (mmdet 2.x) /
``downstream/segmentation`` (mmseg 0.x), guoyongcs/TAPADL ``TAPADL_FAN/segmentation``): the vitzoo backbones map its
official backbone key names while it is loaded (their necks and heads have the mmdet 3.x / mmseg 1.x names already).
The log says which layout the backbone was loaded from; a checkpoint without backbone tensors is refused, as is one
whose backbone tensors do not fit (the error names the keys), instead of testing a randomly initialised backbone.
"""
import argparse

try:
    import vitzoo  # noqa: F401
except ModuleNotFoundError as e:  # the tools use the installed package
    raise SystemExit('vitzoo is not installed: `pip install -e .` in the vitzoo checkout') if e.name == 'vitzoo' else e
from vitzoo.mm import add_runner_args, build_runner, load_config, parse_runner_args, trusted_checkpoints


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description='Test (evaluate) a detector / segmentor (mmengine Runner)')
    p.add_argument('config', help='config file')
    p.add_argument('checkpoint', help='checkpoint file')
    p.add_argument('--out', help='dump the raw predictions to this pickle file')
    p.add_argument('--trust-checkpoint', action='store_true',
                   help='allow a full unpickle of CHECKPOINT if the weights-only load refuses it')
    add_runner_args(p, 'where the evaluation logs go')
    return parse_runner_args(p, argv)


def backbone_load_report(model: 'torch.nn.Module') -> str:
    """One log line on how the backbone's weights were loaded; raises if a vitzoo backbone received none.

    Args:
        model: The detector / segmentor (a model wrapper is unwrapped).
    """
    from mmengine.model import is_model_wrapper
    model = model.module if is_model_wrapper(model) else model
    backbone = getattr(model, 'backbone', None)
    if not hasattr(backbone, 'loaded_layout'):
        return f'mm_test: the backbone ({type(backbone).__name__}) is not a vitzoo backbone; loaded by mmengine as is'
    name = f'{type(backbone).__name__} ({backbone.model_name})'
    if backbone.loaded_layout is None:
        raise RuntimeError(f'mm_test: the checkpoint has no tensors for the backbone {name} (no "backbone." keys): '
                           f'the test would evaluate a randomly initialised backbone')
    if backbone.loaded_layout == 'official':
        return f'mm_test: backbone {name} was mapped from the official checkpoint layout onto backbone.model.*'
    return f'mm_test: backbone {name} was loaded from the vitzoo layout (backbone.model.*)'


def main(argv=None):
    args = parse_args(argv)
    from mmengine.hooks import Hook

    class _BackboneLoadReport(Hook):
        """Logs :func:`backbone_load_report` (``before_test`` runs right after the Runner loaded CHECKPOINT)."""

        def before_test(self, runner) -> None:
            runner.logger.info(backbone_load_report(runner.model))

    cfg = load_config(args.config, args.launcher, args.cfg_options, args.work_dir)
    cfg.load_from = args.checkpoint
    cfg.resume = False
    # the backbone's ImageNet init is pointless (and may be unavailable) when a full checkpoint is loaded
    backbone = cfg.model.get('backbone', {})
    backbone.pop('pretrained', None)
    backbone['init_cfg'] = None
    if args.out:
        cfg.test_evaluator = [cfg.test_evaluator] if isinstance(cfg.test_evaluator, dict) else list(cfg.test_evaluator)
        cfg.test_evaluator.append(dict(type='DumpResults', out_file_path=args.out))
    runner = build_runner(cfg)
    runner.register_hook(_BackboneLoadReport(), priority='VERY_HIGH')
    with trusted_checkpoints(cfg.work_dir, files=[args.checkpoint] if args.trust_checkpoint else ()):
        metrics = runner.test()
    return metrics


if __name__ == '__main__':
    main()
