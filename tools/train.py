#!/usr/bin/env python3
"""Train / fine-tune vitzoo (and any timm) models with the methods' losses, timm style.

Flags keep timm's ``train.py`` names and meaning; ``-c/--config`` YAML keys (flag names with underscores) set the
defaults, the command line overrides them. The method loss follows the model family (``--method auto``): ADL for
``tap_*`` models, Sparsifiner's phase 1 / 2 distillation for ``sparsifiner_*``, SAT's area + normalization losses for
``sat_*``, plain (soft-target) cross-entropy otherwise.

Examples::

    python tools/train.py -c configs/train/demo_agent_deit.yaml --output output/train
    torchrun --nproc_per_node=2 tools/train.py -c configs/train/demo_agent_deit.yaml
    python tools/train.py --resume output/train/<run>/last.pth -c configs/train/demo_agent_deit.yaml

Outputs (``--output/--experiment``): ``args.yaml``, ``summary.csv`` (epoch, train_loss [+ method terms], eval_loss,
eval_top1, eval_top5, lr), ``last.pth`` (also every ``--checkpoint-interval`` steps, with the data position: a resumed
run reproduces an uninterrupted one bit for bit on the same hardware / thread count) and ``best.pth``.
"""
import argparse
import contextlib
import csv
import difflib
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import yaml

import timm
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, ParseKwargs, accuracy, random_seed, update_summary
from torchvision.datasets import ImageFolder

try:
    import vitzoo  # noqa: F401  (registers the models)
except ModuleNotFoundError as e:  # the tools use the installed package
    raise SystemExit('vitzoo is not installed: `pip install -e .` in the vitzoo checkout') if e.name == 'vitzoo' else e
from vitzoo.distributed import Distributed, DistributedError, ShardSampler
from vitzoo.models import unwrap_state_dict
from vitzoo.train_utils import (
    MethodLoss, ResumableSampler, SeededDataset, TrainError, TrainWrapper, atomic_save, check_head, get_rng_state,
    load_checkpoint, logits_of, method_of, set_rng_state, to_primitive)

_logger = logging.getLogger('train')


# ----------------------------------------------------------------------------------------------------------------------
# arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-c', '--config', default='', help='YAML file whose keys set the defaults')
    g = p.add_argument_group('data')
    g.add_argument('data_dir_pos', nargs='?', metavar='DIR', help='dataset root (same as --data-dir)')
    g.add_argument('--data-dir', default=None, help='dataset root: <root>/<train-split>/<class>/*, <root>/<val-split>')
    g.add_argument('--dataset', default='', help="'' / 'folder' (ImageFolder) or 'shapes' (embedded data, generated "
                                                 'into --data-dir if absent)')
    g.add_argument('--train-split', default='train')
    g.add_argument('--val-split', default='val')
    g.add_argument('--shapes-num-train', type=int, default=600, help='shapes: training images')
    g.add_argument('--shapes-num-val', type=int, default=200, help='shapes: validation images')
    g.add_argument('--shapes-img-size', type=int, default=64, help='shapes: stored image size')
    g = p.add_argument_group('model')
    g.add_argument('--model', default='agent_deit_tiny', help='timm / vitzoo model name')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='extra model args, key=value')
    g.add_argument('--pretrained', action='store_true', help='start from the pretrained weights')
    g.add_argument('--initial-checkpoint', default='', help='load these weights before training')
    g.add_argument('--require-initial-checkpoint', action='store_true',
                   help='the recipe fine-tunes given weights: a run without --initial-checkpoint is an error')
    g.add_argument('--resume', default='', help='resume model + optimizer + schedule + data position from last.pth')
    g.add_argument('--num-classes', type=int, default=None, help='classes (default: from the dataset)')
    g.add_argument('--img-size', type=int, default=None, help='image size (default: the model cfg)')
    g.add_argument('--crop-pct', type=float, default=None, help='eval center-crop fraction (default: the model cfg)')
    g.add_argument('--crop-mode', default=None, help="eval crop mode 'center', 'squash' or 'border' (default: the "
                                                     'model cfg)')
    g.add_argument('--mean', type=float, nargs=3, default=None)
    g.add_argument('--std', type=float, nargs=3, default=None)
    g.add_argument('--interpolation', default='', help='resize interpolation (default: the model cfg)')
    g.add_argument('-b', '--batch-size', type=int, default=64, help='batch size per process')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None)
    g.add_argument('--grad-checkpointing', action='store_true')
    g.add_argument('--drop', type=float, default=0.0, help='dropout before the head')
    g.add_argument('--drop-path', type=float, default=None, help='stochastic depth rate')
    g = p.add_argument_group('optimizer / schedule')
    g.add_argument('--opt', default='adamw')
    g.add_argument('--opt-eps', type=float, default=None, help='optimizer epsilon (default: the optimizer)')
    g.add_argument('--opt-betas', type=float, nargs='+', default=None, help='optimizer betas (default: the optimizer)')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=0.05)
    g.add_argument('--clip-grad', type=float, default=None, help='gradient norm clipping (None: off)')
    g.add_argument('--clip-mode', default='norm', help="'norm', 'value' or 'agc'")
    g.add_argument('--lr', type=float, default=None, help='learning rate (default: --lr-base scaled by batch)')
    g.add_argument('--lr-base', type=float, default=5e-4, help='lr at --lr-base-size global batch (linear scaling)')
    g.add_argument('--lr-base-size', type=int, default=512, help='global batch of the *-base learning rates')
    g.add_argument('--sched', default='cosine')
    g.add_argument('--sched-on-updates', action='store_true', help='step the schedule every update')
    g.add_argument('--epochs', type=int, default=300, help='schedule length (warmup included); the run trains '
                                                            '--epochs + --cooldown-epochs')
    g.add_argument('--warmup-epochs', type=int, default=5)
    g.add_argument('--warmup-prefix', action='store_true',
                   help='warmup precedes the --epochs decay instead of being part of it (timm); the run trains '
                        '--warmup-epochs + --epochs + --cooldown-epochs')
    g.add_argument('--warmup-lr', type=float, default=None,
                   help='warmup start lr (default: --warmup-lr-base scaled by batch, else 1e-6)')
    g.add_argument('--warmup-lr-base', type=float, default=None, help='warmup lr at --lr-base-size global batch')
    g.add_argument('--min-lr', type=float, default=None, help='final lr (default: --min-lr-base scaled, else 1e-5)')
    g.add_argument('--min-lr-base', type=float, default=None, help='min lr at --lr-base-size global batch')
    g.add_argument('--cooldown-epochs', type=int, default=0, help='epochs at --min-lr after the schedule')
    g.add_argument('--decay-epochs', type=float, default=90)
    g.add_argument('--decay-rate', type=float, default=0.1)
    g = p.add_argument_group('augmentation / regularization')
    g.add_argument('--no-aug', action='store_true', help='no training augmentation (resize + center crop)')
    g.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0], help='random-resized-crop scale range')
    g.add_argument('--ratio', type=float, nargs=2, default=[3. / 4., 4. / 3.])
    g.add_argument('--train-crop-mode', default='rrc',
                   help="training crop: timm's 'rrc' (random-resized crop, --scale / --ratio), 'rkrc', 'rkrr', or "
                        "'squash': Resize((--train-resize, --train-resize)) then RandomCrop(--img-size), the SAT "
                        'recipe')
    g.add_argument('--train-resize', type=int, default=None,
                   help="--train-crop-mode squash: the square size resized to before the random crop")
    g.add_argument('--train-interpolation', default='',
                   help="training resize interpolation, 'random' for timm's per-image bilinear / bicubic choice "
                        '(default: --interpolation)')
    g.add_argument('--aug-repeats', type=int, default=0,
                   help='repeated augmentation: each image N times per epoch on different ranks, differently '
                        "augmented (timm's RepeatAugSampler / DeiT's RASampler; 0: off)")
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--vflip', type=float, default=0.0)
    g.add_argument('--color-jitter', type=float, default=0.4)
    g.add_argument('--aa', default=None, help="AutoAugment policy, e.g. 'rand-m9-mstd0.5-inc1'")
    g.add_argument('--reprob', type=float, default=0.0, help='random erasing probability')
    g.add_argument('--remode', default='pixel')
    g.add_argument('--mixup', type=float, default=0.0, help='mixup alpha (0: off)')
    g.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha (0: off)')
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', default='batch')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--patch-aug', action='store_true',
                   help="TAP-ADL's patch-wise augmentation (official --use_patch_aug): every step also trains on a "
                        'copy of the (mixed) batch whose patches are crop-resized / noised / flipped (kornia, p 0.1 '
                        'each), a second forward / backward with the classification loss only, before the normal one')
    g.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights (timm ModelEmaV3)')
    g.add_argument('--model-ema-decay', type=float, default=0.9998)
    g = p.add_argument_group('method losses')
    g.add_argument('--method', default='auto', help="'auto' (by model family), 'none', 'adl', 'sparsifiner', 'sat'")
    g.add_argument('--adl-weight', type=float, default=1.0, help='ADL weight (official --adloss)')
    g.add_argument('--adl-threshold', type=float, default=2.0, help='ADL threshold numerator (official --threshold)')
    g.add_argument('--sparsifiner-phase', default='distill', help="'attn_recon' (phase 1), 'distill' (phase 2)")
    g.add_argument('--teacher', default='', help='teacher model name (default: the student model, dense)')
    g.add_argument('--teacher-kwargs', nargs='*', default={}, action=ParseKwargs)
    g.add_argument('--teacher-checkpoint', default='', help='teacher weights (default: --initial-checkpoint)')
    g.add_argument('--teacher-pretrained', action='store_true', help='teacher from its pretrained weights')
    g.add_argument('--attn-recon-weight', type=float, default=0.01)
    g.add_argument('--attn-recon-reduction', default='sum')
    g.add_argument('--cls-distill-weight', type=float, default=0.5)
    g.add_argument('--token-distill-weight', type=float, default=0.5)
    g.add_argument('--area-thr', type=float, default=0.25, help='SAT target foreground ratio (CUB .25, IN .35)')
    g.add_argument('--area-weight', type=float, default=1.0)
    g.add_argument('--norm-weight', type=float, default=1.0)
    g = p.add_argument_group('misc')
    g.add_argument('--amp', action='store_true', help='mixed precision (float16 + GradScaler on CUDA, bfloat16 on CPU)')
    g.add_argument('--amp-dtype', default='', help="'float16' or 'bfloat16' (default by device)")
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('-j', '--workers', type=int, default=4)
    g.add_argument('--output', default='output/train', help='parent folder of the run folders')
    g.add_argument('--experiment', default='', help='run folder name (default: <model>-<time>)')
    g.add_argument('--checkpoint-interval', type=int, default=0, help='also save last.pth every N steps (0: epochs)')
    g.add_argument('--log-interval', type=int, default=50, help='plain-log every N steps (when not on a terminal)')
    g.add_argument('--eval-metric', default='top1')
    g.add_argument('--find-unused-parameters', action='store_true', help='DDP find_unused_parameters')
    g.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                   help='torch.compile the model with this backend (default when given: inductor), as timm')
    g.add_argument('--torchcompile-mode', type=str, default=None,
                   help="torch.compile mode (e.g. 'max-autotune', 'reduce-overhead')")
    g.add_argument('--device', default='', help="'cpu', 'cuda' (default: cuda if available)")
    g.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: leave)')
    g.add_argument('--max-steps-per-epoch', type=int, default=0, help='cap the steps per epoch (0: all)')
    g.add_argument('--print-recipe', action='store_true',
                   help='print the resolved recipe (absolute lrs at the global batch, schedule, eval transform) as '
                        'one JSON object and exit without touching data')
    g.add_argument('--world-size', type=int, default=None,
                   help='--print-recipe only: processes to resolve the recipe for (a run takes it from torchrun)')
    # test hooks (hidden): kill the process after a step; dump every rank's parameters at the end
    g.add_argument('--debug-sigkill-at-step', type=int, default=0, help=argparse.SUPPRESS)
    g.add_argument('--debug-dump-rank-params', action='store_true', help=argparse.SUPPRESS)
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    cfg_parser = argparse.ArgumentParser(add_help=False)
    cfg_parser.add_argument('-c', '--config', default='')
    known, _ = cfg_parser.parse_known_args(argv)
    if known.config:
        if not os.path.isfile(known.config):
            raise TrainError(f'config file not found: {known.config}')
        with open(known.config) as f:
            cfg = yaml.safe_load(f) or {}
        dests = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - dests)
        if unknown:
            raise TrainError(f'{known.config}: unknown keys {unknown}')
        parser.set_defaults(**cfg)
    args = parser.parse_args(argv)
    if args.data_dir_pos:
        args.data_dir = args.data_dir_pos
    del args.data_dir_pos
    return args


# ----------------------------------------------------------------------------------------------------------------------
# recipe: every value the run uses, resolved once (--print-recipe shows it, _train trains with it)


def _check_model_name(name: str) -> None:
    if not timm.is_model(name.split('.')[0]):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise TrainError(f'unknown model {name!r}' + (f' (did you mean {", ".join(close)}?)' if close else ''))


def _scaled_lr(absolute: Optional[float], base: Optional[float], default: float, global_batch: int,
               base_size: int) -> float:
    """An absolute lr wins; else a per-``base_size`` base scaled linearly to ``global_batch``; else ``default``."""
    if absolute is not None:
        return float(absolute)
    if base is not None:
        return float(base) * global_batch / base_size
    return float(default)


def build_optimizer(model: nn.Module, args: argparse.Namespace, lr: float) -> torch.optim.Optimizer:
    kw = {}
    if args.opt_eps is not None:
        kw['eps'] = args.opt_eps
    if args.opt_betas is not None:
        kw['betas'] = tuple(args.opt_betas)
    return create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay, momentum=args.momentum,
                               **kw)


def build_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, recipe: Dict,
                    updates_per_epoch: int):
    """timm's scheduler for the recipe; returns ``(scheduler, total epochs including cooldown)``."""
    return create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_rate=args.decay_rate, min_lr=recipe['min_lr'], warmup_lr=recipe['warmup_lr'],
        warmup_epochs=args.warmup_epochs, cooldown_epochs=args.cooldown_epochs,
        step_on_epochs=not args.sched_on_updates, updates_per_epoch=updates_per_epoch,
        warmup_prefix=args.warmup_prefix)


def eval_transform(recipe: Dict):
    """The validation transform of a resolved recipe (its ``eval`` crop_pct / crop_mode / interpolation)."""
    ev = recipe['eval']
    return create_transform(recipe['img_size'], is_training=False, interpolation=ev['interpolation'],
                            mean=tuple(recipe['mean']), std=tuple(recipe['std']), crop_pct=ev['crop_pct'],
                            crop_mode=ev['crop_mode'])


_METHOD_KEYS = {
    'adl': ('adl_weight', 'adl_threshold'),
    'sat': ('area_thr', 'area_weight', 'norm_weight'),
    'sparsifiner': ('sparsifiner_phase', 'attn_recon_weight', 'attn_recon_reduction', 'cls_distill_weight',
                    'token_distill_weight'),
}
_TRAIN_CROP_MODES = ('rrc', 'rkrc', 'rkrr', 'squash')


def _extra_recipe(args: argparse.Namespace, recipe: Dict) -> Dict:
    """Recipe entries of the training transform, the warmup placement, AMP and the method loss (its own flags)."""
    mode = args.train_crop_mode
    if args.aug_repeats < 0 or args.aug_repeats == 1:
        raise TrainError(f'--aug-repeats must be 0 (off) or >= 2, got {args.aug_repeats}')
    if mode not in _TRAIN_CROP_MODES:
        raise TrainError(f'--train-crop-mode must be one of {", ".join(_TRAIN_CROP_MODES)}, got {mode!r}')
    train_interp = args.train_interpolation or recipe['interpolation']
    if mode == 'squash':
        if not args.train_resize or args.train_resize < recipe['img_size']:
            raise TrainError(f'--train-crop-mode squash needs --train-resize >= the image size {recipe["img_size"]} '
                             f'(e.g. 256 for 224), got {args.train_resize}')
        if train_interp == 'random':
            raise TrainError("--train-crop-mode squash resizes with one interpolation: --train-interpolation "
                             "'random' is for the random-resized crop")
    out = dict(train_crop_mode=mode, train_resize=args.train_resize if mode == 'squash' else None,
               train_interpolation=train_interp, aug_repeats=args.aug_repeats, warmup_prefix=bool(args.warmup_prefix),
               amp=bool(args.amp), patch_aug=bool(args.patch_aug))
    if args.patch_aug and recipe['method'] not in ('adl', 'none'):
        raise TrainError(f"--patch-aug trains the augmented copy with the classification loss alone (the TAP-ADL "
                         f"recipe): it is for --method adl or none, not {recipe['method']!r}")
    out.update({k: getattr(args, k) for k in _METHOD_KEYS.get(recipe['method'], ())})
    if recipe['method'] == 'sparsifiner':
        out['teacher'] = args.teacher or 'student, dense'
        out['teacher_init'] = ('teacher-checkpoint' if args.teacher_checkpoint else
                               'initial-checkpoint' if args.initial_checkpoint or args.require_initial_checkpoint else
                               'pretrained' if args.teacher_pretrained else 'random')
    return out


def build_train_transform(args: argparse.Namespace, recipe: Dict):
    """The training transform of the recipe: timm's (``rrc`` / ``rkrc`` / ``rkrr``) or SAT's ``squash`` pipeline.

    ``squash`` is the official SAT training transform (``DataLoader/CUB_200_2011.py`` and ``ILSVRC.py``):
    ``Resize((s, s))`` (aspect-distorting) -> ``RandomCrop(img_size)`` -> ``RandomHorizontalFlip`` -> ``ToTensor`` ->
    ``Normalize``; any colour augmentation / random erasing the flags ask for follows as in timm's pipeline.
    """
    img_size, mean, std = recipe['img_size'], tuple(recipe['mean']), tuple(recipe['std'])
    if args.no_aug:
        return create_transform(img_size, is_training=False, interpolation=recipe['interpolation'], mean=mean,
                                std=std, crop_pct=1.)
    interp, mode = recipe['train_interpolation'], recipe['train_crop_mode']
    kw = dict(scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip, vflip=args.vflip,
              color_jitter=args.color_jitter, auto_augment=args.aa, interpolation=interp, mean=mean, std=std,
              re_prob=args.reprob, re_mode=args.remode)
    if mode != 'squash':
        return create_transform(img_size, is_training=True, train_crop_mode=mode, **kw)
    from torchvision import transforms as T
    from timm.data.transforms import str_to_interp_mode
    kw['color_jitter'] = args.color_jitter or None  # no ColorJitter(0, 0, 0): it would still draw random numbers
    _, colour, final = create_transform(img_size, is_training=True, separate=True, **kw)
    size = recipe['train_resize']
    crop = [T.Resize((size, size), interpolation=str_to_interp_mode(interp)), T.RandomCrop(img_size)]
    crop += [T.RandomHorizontalFlip(args.hflip)] if args.hflip > 0 else []
    crop += [T.RandomVerticalFlip(args.vflip)] if args.vflip > 0 else []
    return T.Compose(crop + list(colour.transforms) + list(final.transforms))


def resolve_recipe(args: argparse.Namespace) -> Dict:
    """The recipe a run with ``args`` trains with, as a JSON-able dict.

    Learning rates are absolute at the global batch (``batch_size * world_size``): an absolute ``--lr`` /
    ``--warmup-lr`` / ``--min-lr`` wins, else the ``*-base`` value scaled by ``global_batch / --lr-base-size``.
    ``epochs`` is the total trained (cooldown included), optimizer defaults (eps, betas) and the total come from
    building timm's optimizer and scheduler the way the run does; ``eval`` is the validation transform. Touches no
    data and builds no model (only the pretrained cfg is read).
    """
    _check_model_name(args.model)
    world_size = int(getattr(args, 'world_size', None) or 1)
    if world_size < 1:
        raise TrainError(f'--world-size must be >= 1, got {world_size}')
    if args.batch_size < 1:
        raise TrainError(f'--batch-size must be >= 1, got {args.batch_size}')
    global_batch = args.batch_size * world_size
    lr = _scaled_lr(args.lr, args.lr_base, 0.0, global_batch, args.lr_base_size)
    warmup_lr = _scaled_lr(args.warmup_lr, args.warmup_lr_base, 1e-6, global_batch, args.lr_base_size)
    min_lr = _scaled_lr(args.min_lr, args.min_lr_base, 1e-5, global_batch, args.lr_base_size)

    pcfg = timm.models.get_pretrained_cfg(args.model)
    cfg = pcfg.to_dict() if pcfg is not None else {}
    cfg.update(dict(args.model_kwargs).get('pretrained_cfg_overlay') or {})
    interp = args.interpolation or cfg.get('interpolation') or 'bicubic'
    if args.initial_checkpoint or args.require_initial_checkpoint:
        init = 'initial-checkpoint'
    elif args.pretrained:
        init = f'pretrained:{cfg.get("architecture", args.model.split(".")[0])}.{cfg.get("tag")}'
    else:
        init = 'scratch'

    recipe = dict(
        model=args.model, init=init, img_size=args.img_size or cfg.get('input_size', (3, 224, 224))[-1],
        num_classes=args.num_classes, world_size=world_size, batch_size=args.batch_size, global_batch=global_batch,
        opt=args.opt, lr=lr, warmup_lr=warmup_lr, min_lr=min_lr,
        lr_base=None if args.lr is not None else args.lr_base,
        warmup_lr_base=None if args.warmup_lr is not None else args.warmup_lr_base,
        min_lr_base=None if args.min_lr is not None else args.min_lr_base, lr_base_size=args.lr_base_size,
        weight_decay=args.weight_decay, sched=args.sched, sched_on_updates=bool(args.sched_on_updates),
        epochs=None, sched_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        cooldown_epochs=args.cooldown_epochs, clip_grad=args.clip_grad, clip_mode=args.clip_mode, drop=args.drop,
        drop_path=args.drop_path, model_ema=bool(args.model_ema),
        model_ema_decay=args.model_ema_decay if args.model_ema else None,
        smoothing=args.smoothing, mixup=args.mixup, cutmix=args.cutmix, mixup_prob=args.mixup_prob,
        mixup_switch_prob=args.mixup_switch_prob, mixup_mode=args.mixup_mode, no_aug=bool(args.no_aug),
        scale=list(args.scale), ratio=list(args.ratio), hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, aa=args.aa, reprob=args.reprob, remode=args.remode, interpolation=interp,
        mean=list(args.mean or cfg.get('mean') or timm.data.IMAGENET_DEFAULT_MEAN),
        std=list(args.std or cfg.get('std') or timm.data.IMAGENET_DEFAULT_STD),
        eval=dict(crop_pct=args.crop_pct or cfg.get('crop_pct') or 0.875,
                  crop_mode=args.crop_mode or cfg.get('crop_mode') or 'center', interpolation=interp),
        method=method_of(args.model) if args.method == 'auto' else args.method, seed=args.seed)
    recipe.update(_extra_recipe(args, recipe))
    if recipe['eval']['crop_mode'] not in ('center', 'squash', 'border'):
        raise TrainError(f"--crop-mode must be 'center', 'squash' or 'border', got {recipe['eval']['crop_mode']!r}")

    # the optimizer's defaults and the scheduler's total exactly as the run builds them (on a dummy parameter)
    optimizer = build_optimizer(nn.Linear(1, 1), args, lr)
    group = optimizer.param_groups[0]
    recipe['opt_eps'] = group.get('eps')
    recipe['opt_betas'] = list(group['betas']) if 'betas' in group else None
    recipe['momentum'] = group.get('momentum')
    _, recipe['epochs'] = build_scheduler(optimizer, args, recipe, updates_per_epoch=1)
    return recipe


# ----------------------------------------------------------------------------------------------------------------------
# setup


def setup_distributed(args: argparse.Namespace) -> Distributed:
    """torchrun sets WORLD_SIZE / RANK / LOCAL_RANK (+ MASTER_ADDR/PORT); gloo on CPU, nccl on GPU."""
    if args.world_size is not None:
        raise TrainError('--world-size is only for --print-recipe: a run takes the world size from torchrun')
    try:
        dd = Distributed(args.device)
    except DistributedError as e:
        raise TrainError(str(e)) from e
    args.world_size, args.rank, args.local_rank = dd.world_size, dd.rank, dd.local_rank
    args.distributed, args.device = dd.distributed, str(dd.device)
    return dd


def build_datasets(args: argparse.Namespace):
    if not args.data_dir:
        raise TrainError('no dataset: give --data-dir (or the DIR argument / data_dir in the config)')
    if args.dataset == 'shapes':
        if args.rank == 0 and not os.path.isdir(os.path.join(args.data_dir, args.train_split)):
            from vitzoo.data.shapes import write_image_folder
            write_image_folder(args.data_dir, num_train=args.shapes_num_train, num_val=args.shapes_num_val,
                               num_classes=args.num_classes or 10, img_size=args.shapes_img_size, seed=0,
                               progress=False)
        if args.distributed:
            dist.barrier()
    elif args.dataset not in ('', 'folder', 'imagefolder'):
        raise TrainError(f"unknown --dataset {args.dataset!r}: use '' / 'folder' (ImageFolder) or 'shapes'")
    roots = [os.path.join(args.data_dir, s) for s in (args.train_split, args.val_split)]
    for r in roots:
        if not os.path.isdir(r):
            raise TrainError(f'data folder not found: {r} (expected <data-dir>/{{{args.train_split},'
                             f'{args.val_split}}}/<class>/<images>)')
    train, val = ImageFolder(roots[0]), ImageFolder(roots[1])
    if train.classes != val.classes:
        raise TrainError(f'{roots[0]} and {roots[1]} have different class folders')
    if args.num_classes is None:
        args.num_classes = len(train.classes)
    elif args.num_classes != len(train.classes):
        raise TrainError(f'--num-classes {args.num_classes} but {roots[0]} has {len(train.classes)} class folders')
    return train, val


def create_model(args: argparse.Namespace) -> nn.Module:
    name = args.model
    _check_model_name(name)
    kwargs = dict(args.model_kwargs)
    if args.img_size is not None:
        kwargs.setdefault('img_size', args.img_size)
    if args.drop_path is not None:
        kwargs['drop_path_rate'] = args.drop_path
    try:
        model = timm.create_model(name, pretrained=args.pretrained, num_classes=args.num_classes,
                                  drop_rate=args.drop, **kwargs)
    except TypeError as e:  # models without an img_size argument (CNNs) run at any size anyway
        if 'img_size' not in str(e) or 'img_size' in args.model_kwargs:
            raise
        kwargs.pop('img_size')
        model = timm.create_model(name, pretrained=args.pretrained, num_classes=args.num_classes,
                                  drop_rate=args.drop, **kwargs)
    if args.initial_checkpoint:
        load_weights(model, args.initial_checkpoint)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def load_weights(model: nn.Module, path: str) -> None:
    """Initial weights: our checkpoints, plain state dicts or official ones (through the family's filter)."""
    sd = unwrap_state_dict(load_checkpoint(path))
    classifier = model.pretrained_cfg.get('classifier', 'head')
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    check_head(sd, model, classifier, path)
    filter_fn = getattr(sys.modules.get(type(model).__module__), 'checkpoint_filter_fn', None)
    if filter_fn is not None and not set(model.state_dict()) >= set(sd):
        sd = filter_fn(sd, model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected:
        raise TrainError(f'{path}: keys not in {type(model).__name__}: {unexpected[:5]}...')
    if missing:
        _logger.warning(f'{path}: {len(missing)} parameters not in the checkpoint, left as initialised: {missing[:5]}')


def build_patch_aug(model: nn.Module, recipe: Dict, device: str) -> nn.Module:
    """``--patch-aug``: :class:`vitzoo.data.patch_aug.PatchLevelAug` with the model's patch size and the recipe's
    normalisation (the clamp limits)."""
    try:
        from vitzoo.data.patch_aug import PatchLevelAug, model_patch_size
        size = model_patch_size(model)
        aug = PatchLevelAug(size, mean=recipe['mean'], std=recipe['std'])
    except (ImportError, ValueError) as e:
        raise TrainError(f'--patch-aug: {e}') from e
    if recipe['img_size'] % size:
        raise TrainError(f'--patch-aug cuts images into the model\'s {size}x{size} patches: the image size '
                         f'{recipe["img_size"]} is not a multiple of {size}')
    return aug.to(device)


def build_method_loss(args: argparse.Namespace, model: nn.Module, cls_loss: nn.Module) -> MethodLoss:
    method = method_of(args.model) if args.method == 'auto' else args.method
    args.method = method
    if method == 'adl':
        from vitzoo.losses.adl import AttentionDiversificationLoss
        return MethodLoss(method, cls_loss, adl=AttentionDiversificationLoss(args.adl_weight, args.adl_threshold))
    if method == 'sat':
        from vitzoo.losses.sat import SATLoss
        return MethodLoss(method, cls_loss, sat=SATLoss(area_thr=args.area_thr, area_weight=args.area_weight,
                                                        norm_weight=args.norm_weight, cls_loss=cls_loss))
    if method == 'sparsifiner':
        from vitzoo.losses.sparsifiner import SparsifinerLoss
        phase = args.sparsifiner_phase
        if phase not in ('attn_recon', 'distill'):
            raise TrainError(f"--sparsifiner-phase must be 'attn_recon' or 'distill', got {phase!r}")
        if not hasattr(model, 'set_training_phase'):
            raise TrainError(f'--method sparsifiner needs a Sparsifiner model, got {args.model}')
        model.set_training_phase(phase)
        if args.teacher:
            teacher = timm.create_model(args.teacher, pretrained=args.teacher_pretrained,
                                        num_classes=args.num_classes, **args.teacher_kwargs)
        else:  # the student architecture with dense attention (= DeiT)
            kw = dict(args.model_kwargs, attn_keep_rate=1.0, token_keep_rate=1.0, **args.teacher_kwargs)
            if args.img_size is not None:
                kw.setdefault('img_size', args.img_size)
            teacher = timm.create_model(args.model, pretrained=args.teacher_pretrained, num_classes=args.num_classes,
                                        **kw)
        ckpt = args.teacher_checkpoint or args.initial_checkpoint
        if ckpt:
            load_weights(teacher, ckpt)
        elif not args.teacher_pretrained:
            _logger.warning('sparsifiner: the teacher has random weights (give --teacher-checkpoint)')
        crit = SparsifinerLoss(teacher.to(args.device), phase=phase, attn_recon_weight=args.attn_recon_weight,
                               attn_recon_reduction=args.attn_recon_reduction,
                               cls_distill_weight=args.cls_distill_weight,
                               token_distill_weight=args.token_distill_weight)
        return MethodLoss(method, cls_loss, sparsifiner=crit)
    return MethodLoss(method, cls_loss)


class Progress:
    """tqdm bar on a terminal (rank 0), plain log lines every ``interval`` steps otherwise."""

    def __init__(self, total: int, desc: str, enabled: bool, interval: int, initial: int = 0):
        self.enabled, self.interval, self.total, self.desc = enabled, max(interval, 1), total, desc
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)

    def update(self, step: int, info: Dict[str, float]) -> None:
        if not self.enabled:
            return
        text = ' '.join(f'{k}={v:.4g}' for k, v in info.items())
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
        elif step % self.interval == 0 or step == self.total:
            _logger.info(f'{self.desc} [{step}/{self.total}] {text}')

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------------------------------
# train / eval


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside torch.compile, DDP and :class:`TrainWrapper`."""
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(model, TrainWrapper):
            model = model.model
        else:
            return model


@torch.no_grad()
def evaluate(model: nn.Module, loader, args: argparse.Namespace, amp_ctx) -> Dict[str, float]:
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, top1 hits, top5 hits, count
    k5 = min(5, args.num_classes)
    for x, y in loader:
        x, y = x.to(args.device), y.to(args.device)
        with amp_ctx():
            logits = model(x)
        logits = logits.float()
        top1, top5 = accuracy(logits, y, topk=(1, k5))
        n = x.shape[0]
        sums += torch.tensor([nn.functional.cross_entropy(logits, y, reduction='sum').item(),
                              top1.item() * n / 100, top5.item() * n / 100, n], dtype=torch.float64)
    if args.distributed:
        dist.all_reduce(sums)
    n = max(sums[3].item(), 1)
    return {'loss': sums[0].item() / n, 'top1': 100 * sums[1].item() / n, 'top5': 100 * sums[2].item() / n}


def save_state(path: str, args, model, optimizer, scheduler, ema, scaler, epoch: int, step: int, num_updates: int,
               meters: Dict[str, float], best: Optional[float]) -> None:
    state = {
        'model': unwrap(model).state_dict(), 'optimizer': optimizer.state_dict(),
        'scheduler': to_primitive(scheduler.state_dict()) if scheduler is not None else None,
        'model_ema': ema.module.state_dict() if ema is not None else None,
        'scaler': scaler.state_dict() if scaler is not None else None,
        'epoch': epoch, 'step_in_epoch': step, 'num_updates': num_updates, 'meters': dict(meters),
        'best_metric': best, 'rng': get_rng_state(), 'arch': args.model, 'num_classes': args.num_classes,
        'args': to_primitive({k: v for k, v in vars(args).items() if not k.startswith('_')}),
    }
    atomic_save(state, path)


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (which test harnesses and notebooks swap)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _setup_logging(is_main: bool) -> None:
    _logger.setLevel(logging.INFO if is_main else logging.WARNING)
    if not any(isinstance(h, _StderrHandler) for h in _logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter('%(message)s'))
        _logger.addHandler(handler)
        _logger.propagate = False


def main(argv: Optional[List[str]] = None) -> Dict:
    """Train; returns the final metrics ``{'eval_top1', 'eval_top5', 'eval_loss', 'train_loss', 'epoch',
    'output_dir', 'best_metric'}``. With ``--print-recipe``: prints and returns :func:`resolve_recipe`'s dict."""
    args = parse_args(argv)
    if args.print_recipe:
        args.world_size = args.world_size or int(os.environ.get('WORLD_SIZE', 1))
        recipe = resolve_recipe(args)
        print(json.dumps(recipe, indent=1))
        return recipe
    dd = setup_distributed(args)
    _setup_logging(dd.is_main)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _train(args, dd.is_main)
    finally:
        dd.close()


def _train(args: argparse.Namespace, is_main: bool) -> Dict:
    recipe = resolve_recipe(args)  # what --print-recipe shows; everything below trains with it
    if args.require_initial_checkpoint and not args.initial_checkpoint:
        raise TrainError(f'{args.config or "this recipe"} fine-tunes given weights: give --initial-checkpoint')
    args.lr, args.warmup_lr, args.min_lr = recipe['lr'], recipe['warmup_lr'], recipe['min_lr']
    random_seed(args.seed, args.rank)
    train_set, val_set = build_datasets(args)
    model = create_model(args)
    img_size = recipe['img_size']
    train_set.transform = build_train_transform(args, recipe)
    val_set.transform = eval_transform(recipe)

    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                      switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                      num_classes=args.num_classes)
        cls_loss = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        cls_loss = LabelSmoothingCrossEntropy(args.smoothing)
    else:
        cls_loss = nn.CrossEntropyLoss()
    criterion = build_method_loss(args, model, cls_loss)
    model.to(args.device)
    criterion.to(args.device)
    patch_aug = build_patch_aug(model, recipe, args.device) if recipe['patch_aug'] else None

    # data: order depends only on (seed, epoch); augmentation only on (seed, epoch, index)
    seeded = SeededDataset(train_set, seed=args.seed)
    sampler = ResumableSampler(len(train_set), args.rank, args.world_size, seed=args.seed,
                               num_repeats=recipe['aug_repeats'] or 1)
    loader_gen = torch.Generator().manual_seed(args.seed)  # keeps the DataLoader off the global RNG
    train_loader = torch.utils.data.DataLoader(
        seeded, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers, drop_last=True,
        generator=loader_gen, pin_memory=args.device.startswith('cuda'), persistent_workers=False)
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=args.validation_batch_size or args.batch_size,
        sampler=ShardSampler(len(val_set), args.rank, args.world_size), num_workers=args.workers)
    steps_per_epoch = len(sampler) // args.batch_size
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise TrainError(f'{len(train_set)} training images give no full batch of {args.batch_size} per process')

    optimizer = build_optimizer(model, args, recipe['lr'])
    scheduler, num_epochs = build_scheduler(optimizer, args, recipe, steps_per_epoch)
    amp_dtype = {'float16': torch.float16, 'bfloat16': torch.bfloat16}.get(
        args.amp_dtype or ('float16' if args.device.startswith('cuda') else 'bfloat16'))
    device_type = 'cuda' if args.device.startswith('cuda') else 'cpu'
    scaler = torch.amp.GradScaler(device_type) if args.amp and amp_dtype == torch.float16 else None

    def amp_ctx():
        return torch.autocast(device_type, dtype=amp_dtype) if args.amp else contextlib.nullcontext()

    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None

    start_epoch, start_step, num_updates, meters, best = 0, 0, 0, {}, None
    resume_state = None
    if args.resume:
        resume_state = load_checkpoint(args.resume)
        if resume_state.get('arch') != args.model:
            raise TrainError(f'{args.resume} is a {resume_state.get("arch")} checkpoint, --model is {args.model}')
        check_head(resume_state['model'], model, ('head',), args.resume)
        model.load_state_dict(resume_state['model'])
        optimizer.load_state_dict(resume_state['optimizer'])
        if resume_state.get('scheduler') is not None:
            scheduler.load_state_dict(resume_state['scheduler'])
        if ema is not None and resume_state.get('model_ema') is not None:
            ema.module.load_state_dict(resume_state['model_ema'])
        if scaler is not None and resume_state.get('scaler'):
            scaler.load_state_dict(resume_state['scaler'])
        start_epoch, start_step = resume_state['epoch'], resume_state['step_in_epoch']
        num_updates, meters, best = resume_state['num_updates'], resume_state['meters'], resume_state['best_metric']
        if start_step >= steps_per_epoch:
            start_epoch, start_step, meters = start_epoch + 1, 0, {}

    net = TrainWrapper(model, criterion.method)
    if args.distributed:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[args.local_rank] if device_type == 'cuda' else None,
            find_unused_parameters=args.find_unused_parameters)
    eval_model = model
    if args.torchcompile:
        # after the DDP wrap, as timm's train.py (DDP's hooks stay outside the compiled graph); checkpoints and the
        # EMA keep using the bare model, whose parameters the compiled modules share
        net = torch.compile(net, backend=args.torchcompile, mode=args.torchcompile_mode)
        eval_model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)

    # output folder
    if args.resume:
        out_dir = os.path.dirname(os.path.abspath(args.resume))
    else:
        name = [args.experiment or f'{args.model}-{time.strftime("%Y%m%d-%H%M%S")}']
        if args.distributed:  # every rank uses rank 0's folder name
            dist.broadcast_object_list(name, src=0)
        name = name[0]
        out_dir = os.path.join(args.output, name)
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, 'args.yaml'), 'w') as f:
            yaml.safe_dump(to_primitive({k: v for k, v in vars(args).items()}), f, sort_keys=False)
        with open(os.path.join(out_dir, 'recipe.json'), 'w') as f:
            json.dump(recipe, f, indent=1)
        summary = os.path.join(out_dir, 'summary.csv')
        if args.resume and os.path.exists(summary):  # drop rows of epochs that will be redone
            with open(summary) as f:
                rows = list(csv.reader(f))
            with open(summary, 'w', newline='') as f:
                csv.writer(f).writerows(rows[:1] + [r for r in rows[1:] if int(r[0]) < start_epoch])
        _logger.info(f'{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M params, '
                     f'method {criterion.method}, {len(train_set)} train / {len(val_set)} val images, '
                     f'{args.num_classes} classes, {img_size}px, world {args.world_size}, lr {args.lr:.3g}, '
                     f'output {out_dir}')
    last_path, best_path = os.path.join(out_dir, 'last.pth'), os.path.join(out_dir, 'best.pth')

    if resume_state is not None:
        set_rng_state(resume_state['rng'])  # last: everything above may have consumed random numbers
        _logger.info(f'resumed {args.resume}: epoch {start_epoch} step {start_step}')

    eval_metrics: Dict[str, float] = {}
    train_metrics: Dict[str, float] = {}
    global_step = 0
    for epoch in range(start_epoch, num_epochs):
        seeded.epoch = epoch
        sampler.set_epoch(epoch)
        step0 = start_step if epoch == start_epoch else 0
        sampler.set_start(step0 * args.batch_size)
        if step0 == 0:
            meters = {}
        scheduler.step(epoch)
        if args.sched_on_updates:
            scheduler.step_update(num_updates)
        net.train()
        criterion.train()
        prog = Progress(steps_per_epoch, f'epoch {epoch}', is_main, args.log_interval, initial=step0)
        t0, seen = time.perf_counter(), 0
        for step, (x, y) in enumerate(train_loader, start=step0 + 1):
            if step > steps_per_epoch:
                break
            x, y = x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
            if mixup is not None:
                x, y = mixup(x, y)
            optimizer.zero_grad(set_to_none=True)
            aug_terms = {}
            if patch_aug is not None:
                # official order (TAPADL_RVT/engine.py): the patch-augmented copy's forward / backward first, with the
                # classification loss alone and the same (mixed) targets; its gradients stay in .grad and the normal
                # backward adds to them, so one clip + step sees the sum. DDP: no_sync() holds the first all-reduce
                # back and the second all-reduces the sum (the same mean as two all-reduces).
                x_aug = patch_aug(x)
                with net.no_sync() if args.distributed else contextlib.nullcontext():
                    with amp_ctx():
                        aug_loss = criterion.cls_loss(logits_of(net(x_aug, plain=True)), y)
                    (scaler.scale(aug_loss) if scaler is not None else aug_loss).backward()
                aug_terms['patch_aug_loss'] = aug_loss.item()
                if not math.isfinite(aug_terms['patch_aug_loss']):
                    raise FloatingPointError(f'patch-aug loss is {aug_loss.item()} at epoch {epoch} step {step}')
            with amp_ctx():
                output = net(x)
                loss, terms = criterion(x, output, y)
            terms.update(aug_terms)
            if scaler is not None:
                scaler.scale(loss).backward()
                if args.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    timm.utils.dispatch_clip_grad(model.parameters(), args.clip_grad, mode=args.clip_mode)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if args.clip_grad is not None:
                    timm.utils.dispatch_clip_grad(model.parameters(), args.clip_grad, mode=args.clip_mode)
                optimizer.step()
            num_updates += 1
            global_step += 1
            if ema is not None:
                ema.update(model, step=num_updates)
            if args.sched_on_updates:
                scheduler.step_update(num_updates)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f'loss is {loss.item()} at epoch {epoch} step {step}')
            for k, v in {'loss': loss.item(), **terms}.items():
                meters[k] = meters.get(k, 0.0) + v
            meters['_n'] = meters.get('_n', 0) + 1
            seen += x.shape[0] * args.world_size
            lr = optimizer.param_groups[0]['lr']
            prog.update(step, {'loss': loss.item(), **terms, 'lr': lr,
                               'img/s': seen / max(time.perf_counter() - t0, 1e-9)})
            if args.checkpoint_interval and step % args.checkpoint_interval == 0 and step < steps_per_epoch:
                if is_main:
                    save_state(last_path, args, net, optimizer, scheduler, ema, scaler, epoch, step, num_updates,
                               meters, best)
            if args.debug_sigkill_at_step and global_step == args.debug_sigkill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
        prog.close()
        n = max(meters.get('_n', 1), 1)
        train_metrics = {k: v / n for k, v in meters.items() if k != '_n'}
        eval_metrics = evaluate(eval_model, val_loader, args, amp_ctx)
        if ema is not None:
            ema_metrics = evaluate(ema.module, val_loader, args, amp_ctx)
            eval_metrics.update({f'ema_{k}': v for k, v in ema_metrics.items()})
        scheduler.step(epoch + 1, eval_metrics[args.eval_metric])
        metric = eval_metrics[args.eval_metric]
        improved = best is None or metric > best
        best = metric if improved else best
        if is_main:
            _logger.info(f'epoch {epoch}: train_loss {train_metrics.get("loss", float("nan")):.4f} | eval_loss '
                         f'{eval_metrics["loss"]:.4f} top1 {eval_metrics["top1"]:.2f} top5 {eval_metrics["top5"]:.2f}')
            update_summary(epoch, train_metrics, eval_metrics, os.path.join(out_dir, 'summary.csv'),
                           lr=optimizer.param_groups[0]['lr'])
            save_state(last_path, args, net, optimizer, scheduler, ema, scaler, epoch, steps_per_epoch, num_updates,
                       meters, best)
            if improved:
                save_state(best_path, args, net, optimizer, scheduler, ema, scaler, epoch, steps_per_epoch,
                           num_updates, meters, best)
    if args.debug_dump_rank_params:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                   os.path.join(out_dir, f'rank{args.rank}_params.pth'))
    result = {f'eval_{k}': v for k, v in eval_metrics.items()}
    result.update({f'train_{k}': v for k, v in train_metrics.items()})
    result.update(output_dir=out_dir, best_metric=best, epoch=num_epochs - 1)
    return result


def cli() -> None:
    try:
        main()
    except TrainError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    cli()
