"""What the mmengine Runner tools (``tools/mm_train.py``, ``tools/mm_test.py``) share: arguments, config, Runner."""
import argparse
import os
import os.path as osp
from typing import Any, Dict, Optional, Sequence

__all__ = ['add_runner_args', 'parse_runner_args', 'load_config', 'build_runner']


def add_runner_args(parser: argparse.ArgumentParser, work_dir_help: str) -> None:
    """Add the options every Runner tool takes: ``--work-dir``, ``--cfg-options``, ``--launcher``, ``--local-rank``."""
    from mmengine.config import DictAction
    parser.add_argument('--work-dir', help=work_dir_help)
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries, key=value')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_runner_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv``; ``LOCAL_RANK`` defaults to ``--local-rank`` (the launchers set it)."""
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def load_config(config: str, launcher: str = 'none', cfg_options: Optional[Dict[str, Any]] = None,
                work_dir: Optional[str] = None):
    """The mmengine ``Config`` of a file with the launcher, overrides and work_dir applied.

    Args:
        config: Config file.
        launcher: 'none', 'pytorch', 'slurm' or 'mpi'.
        cfg_options: ``--cfg-options`` overrides.
        work_dir: Where logs and checkpoints go; default the config's, else ``./work_dirs/<config name>``.
    """
    from mmengine.config import Config
    cfg = Config.fromfile(config)
    cfg.launcher = launcher
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if work_dir:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config))[0])
    return cfg


def build_runner(cfg):
    """mmengine's Runner for ``cfg`` (or the config's ``runner_type``)."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    return Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
