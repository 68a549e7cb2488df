"""tools/train.py: DDP, exact resume after SIGKILL, method losses, a learning demo, clear errors."""
import csv
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import timm
from vitzoo.data.shapes import write_image_folder
from vitzoo.train_utils import TrainError

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / 'tools' / 'train.py'
_spec = importlib.util.spec_from_file_location('vitzoo_train_tool', TRAIN)
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

# a 35k-parameter Agent-DeiT at 32 px (4x4 patches of 8 px, 16 agents)
TINY = ['--model', 'agent_deit_tiny', '--img-size', '32', '--model-kwargs', 'patch_size=8', 'embed_dim=32',
        'depth=2', 'num_heads=2', 'agent_num=4']
FAST = ['--threads', '1', '-j', '0', '-b', '8', '--lr', '1e-3', '--warmup-epochs', '0', '--crop-pct', '1.0']
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('train_data') / 'shapes'
    return write_image_folder(root, num_train=48, num_val=16, num_classes=4, img_size=32, seed=0, progress=False)


def _rows(out_dir) -> list:
    with open(Path(out_dir) / 'summary.csv') as f:
        return list(csv.DictReader(f))


def _load(path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)  # must work: tensors / primitives only


def test_torchrun_two_processes_gloo(data, tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(TRAIN),
           '--data-dir', str(data), *TINY, *FAST, '--epochs', '1', '--drop-path', '0.1', '--output', str(tmp_path),
           '--experiment', 'ddp', '--debug-dump-rank-params']
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / 'ddp'
    p0, p1 = _load(out / 'rank0_params.pth'), _load(out / 'rank1_params.pth')
    assert p0.keys() == p1.keys()
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k
    ckpt = _load(out / 'last.pth')
    assert ckpt['epoch'] == 0 and ckpt['step_in_epoch'] == 3  # 48 images / (2 ranks x 8) = 3 steps
    # the checkpoint is the trained model (not the initial one) and equals every rank's weights
    assert all(torch.equal(ckpt['model'][k], p0[k]) for k in p0)
    assert sorted(p.name for p in out.glob('*.pth')) == ['best.pth', 'last.pth', 'rank0_params.pth',
                                                         'rank1_params.pth']
    rows = _rows(out)
    assert len(rows) == 1 and {'epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr'} <= rows[0].keys()
    assert (out / 'args.yaml').read_text().count('world_size: 2') == 1


@pytest.mark.parametrize('patch_aug', [False, True])
def test_sigkill_mid_epoch_then_resume_is_exact(data, tmp_path, patch_aug):
    # random augmentation, mixup, drop-path, EMA and a per-step schedule (and --patch-aug's draws from torch's CPU
    # generator): all must be restored exactly
    common = ['--data-dir', str(data), *TINY, *FAST, '--epochs', '2', '--drop-path', '0.1', '--mixup', '0.2',
              '--hflip', '0.5', '--scale', '0.5', '1.0', '--model-ema', '--model-ema-decay', '0.9',
              '--sched-on-updates', '--warmup-epochs', '1', '--checkpoint-interval', '2', '--output', str(tmp_path),
              '--seed', '3'] + (['--patch-aug'] if patch_aug else [])
    ref = train.main(common + ['--experiment', 'ref'])
    # 6 steps per epoch; killed at global step 9 = epoch 1 step 3, the last save was epoch 1 step 2
    res = subprocess.run([sys.executable, str(TRAIN), *common, '--experiment', 'killed', '--debug-sigkill-at-step',
                          '9'], env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    last = tmp_path / 'killed' / 'last.pth'
    state = _load(last)
    assert (state['epoch'], state['step_in_epoch'], state['num_updates']) == (1, 2, 8)
    assert not list((tmp_path / 'killed').glob('.*.tmp'))  # no temporary file left behind
    resumed = train.main(common + ['--resume', str(last)])
    assert resumed['output_dir'] == str(tmp_path / 'killed')
    a, b = _load(tmp_path / 'ref' / 'last.pth'), _load(last)
    for key in ('model', 'model_ema'):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for pa, pb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert b['num_updates'] == 12
    assert [r['train_loss'] for r in _rows(tmp_path / 'ref')] == [r['train_loss'] for r in _rows(tmp_path / 'killed')]
    assert resumed['eval_top1'] == ref['eval_top1'] and resumed['eval_loss'] == ref['eval_loss']


def _tiny_ckpt(tmp_path, name, **kw) -> str:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4, **kw)
    path = str(tmp_path / f'{name}_init.pth')
    torch.save({'model': model.state_dict()}, path)
    return path


SPARS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.mark.parametrize('method', ['adl_fan', 'sat', 'sparsifiner_attn_recon', 'sparsifiner_distill'])
def test_method_losses(data, tmp_path, method, capsys):
    args = ['--data-dir', str(data), *FAST, '--epochs', '1', '--max-steps-per-epoch', '2', '--img-size', '32',
            '--output', str(tmp_path), '--experiment', method, '--log-interval', '1']
    if method == 'adl_fan':
        args += ['--model', 'tap_fan_tiny_12_p16_224', '--model-kwargs', 'embed_dim=32', 'depth=2', 'num_heads=2',
                 'patch_size=8', '--adl-weight', '0.5',
                 '--adl-threshold', '0.5']  # the default 2 / N zeroes the near-uniform maps of a fresh model
        terms = ['cls_loss', 'adl_loss']
    elif method == 'sat':
        args += ['--model', 'sat_deit_tiny', '--model-kwargs', 'embed_dim=32', 'depth=3', 'num_heads=2',
                 'patch_size=8', 'num_spatial_blocks=2', '--area-thr', '0.3',
                 # the recipe's crop, plus repeated augmentation: both through a real run
                 '--train-crop-mode', 'squash', '--train-resize', '40', '--aug-repeats', '3']
        terms = ['cls_loss', 'area_loss', 'norm_loss']
    else:
        phase = method.split('_', 1)[1]
        init = _tiny_ckpt(tmp_path, 'sparsifiner_deit_tiny', **SPARS)
        args += ['--model', 'sparsifiner_deit_tiny', '--model-kwargs', *[f'{k}={v}' for k, v in SPARS.items()
                                                                        if k != 'img_size'],
                 '--sparsifiner-phase', phase, '--initial-checkpoint', init]
        terms = ['attn_recon_loss'] if phase == 'attn_recon' else ['cls_loss', 'cls_distill_loss',
                                                                   'token_distill_loss']
    out = train.main(args)
    log = capsys.readouterr().err
    row = _rows(out['output_dir'])[0]
    for t in terms:
        assert float(row[f'train_{t}']) == float(row[f'train_{t}']) and f'{t}=' in log, t  # finite, logged
        assert float(row[f'train_{t}']) > 0, t
    assert float(row['train_loss']) > 0
    if method.startswith('sparsifiner'):
        # phase 1 trains only the predictors, phase 2 only the backbone
        before = _load(init)['model']
        after = _load(Path(out['output_dir']) / 'last.pth')['model']
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        pred = {k for k in before if 'mask_predictor' in k}
        assert changed and (changed <= pred if phase == 'attn_recon' else not (changed & pred))
        if phase == 'distill':  # the teacher (= initial weights) gives a nonzero but bounded KL at the start
            assert float(row['train_cls_distill_loss']) >= 0


def test_demo_recipe_learns(tmp_path):
    """The demo recipe (its data, optimizer and schedule) learns, in 5 epochs instead of 20 (~45 s instead of ~280 s
    on a loaded 2-core machine): with a 0.1M-parameter RVT, whose conv stem leaves chance level in the first epoch,
    where the recipe's patch-embedding Agent-DeiT stays at chance for ~5 epochs."""
    cfg = ROOT / 'configs' / 'train' / 'demo_agent_deit.yaml'
    out = train.main(['-c', str(cfg), '--data-dir', str(tmp_path / 'shapes'), '--output', str(tmp_path),
                      '--experiment', 'demo', '--model', 'rvt_tiny', '--model-kwargs', 'patch_size=4', 'base_dims=[32]',
                      'depth=[2]', 'heads=[2]', '--epochs', '5', '--warmup-epochs', '1'])
    # 4 classes, 200 val images: chance is 25 % +- 3.1 % (1 sigma); measured 43.5 % (train loss 1.42 -> 1.11)
    assert out['eval_top1'] >= 36.0, out
    assert out['train_loss'] < 1.3  # from ln(4) = 1.386


def test_bad_inputs(data, tmp_path):
    base = [*FAST, '--epochs', '1', '--output', str(tmp_path)]
    with pytest.raises(TrainError, match='data folder not found'):
        train.main(['--data-dir', str(tmp_path / 'nope'), *TINY, *base])
    with pytest.raises(TrainError, match=r"unknown model 'agent_deit_tinny' \(did you mean agent_deit_tiny"):
        train.main(['--data-dir', str(data), '--model', 'agent_deit_tinny', *base])
    ckpt = tmp_path / 'ten.pth'
    model = timm.create_model('agent_deit_tiny', num_classes=10, img_size=32, patch_size=8, embed_dim=32, depth=2,
                              num_heads=2, agent_num=4)
    torch.save({'model': model.state_dict()}, ckpt)
    with pytest.raises(TrainError, match='class-count mismatch: .* 10-class classifier .* model has 4 classes'):
        train.main(['--data-dir', str(data), *TINY, *base, '--initial-checkpoint', str(ckpt)])
    with pytest.raises(TrainError, match='--num-classes 7 but .* has 4 class folders'):
        train.main(['--data-dir', str(data), *TINY, *base, '--num-classes', '7'])
    # the command line prints one line, no traceback
    res = subprocess.run([sys.executable, str(TRAIN), '--data-dir', str(tmp_path / 'nope'), *TINY, *base],
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith('error: data folder not found')
    assert 'Traceback' not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_recipe_configs_parse():
    files = sorted((ROOT / 'configs' / 'train').glob('*.yaml'))
    assert len(files) >= 30
    for f in files:
        args = train.parse_args(['-c', str(f)])
        assert timm.is_model(args.model), f
    with pytest.raises(TrainError, match=r"unknown keys \['not_a_flag'\]"):
        bad = ROOT / 'configs' / 'train' / 'demo_agent_deit.yaml'
        text = bad.read_text() + 'not_a_flag: 1\n'
        tmp = Path(os.environ.get('TMPDIR', '/tmp')) / f'bad_cfg_{os.getpid()}.yaml'
        tmp.write_text(text)
        try:
            train.parse_args(['-c', str(tmp)])
        finally:
            tmp.unlink()


# ---- recipe features: SAT's squash crop, repeated augmentation, per-iteration schedule with a warmup prefix ----------


@pytest.mark.parametrize('config', ['sat_deit_small_cub', 'sat_deit_small_in1k'])
def test_squash_train_crop_is_sats_official_pipeline(config):
    """--train-crop-mode squash == SAT's DataLoader transform (Resize((256, 256)) -> RandomCrop(224) -> flip ->
    ToTensor -> Normalize), draw for draw: same output images from the same seed, over a sequence of images."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms as T
    args = train.parse_args(['-c', str(ROOT / 'configs' / 'train' / f'{config}.yaml')])
    ours = train.build_train_transform(args, train.resolve_recipe(args))
    official = T.Compose([  # wpy1999/SAT DataLoader/CUB_200_2011.py and ILSVRC.py, phase 'train'
        T.Resize((256, 256)), T.RandomCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
        T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              [(300, 200), (180, 420), (256, 256), (500, 333)] * 3]
    torch.manual_seed(7)
    a = [ours(im) for im in images]
    torch.manual_seed(7)
    b = [official(im) for im in images]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (3, 224, 224)
    assert not all(torch.equal(a[i], a[i + 4]) for i in range(4))  # random crops / flips really happen
    args.train_resize = None
    with pytest.raises(TrainError, match='squash needs --train-resize'):
        train.resolve_recipe(args)


def test_fan_recipe_trains_with_random_interpolation():
    """TAPADL_FAN/main.py --train-interpolation random: timm's per-image bilinear / bicubic choice (eval: bicubic)."""
    args = train.parse_args(['-c', str(ROOT / 'configs' / 'train' / 'tap_fan_base_16_p4_hybrid.yaml')])
    recipe = train.resolve_recipe(args)
    rrc = train.build_train_transform(args, recipe).transforms[0]
    assert type(rrc).__name__ == 'RandomResizedCropAndInterpolation' and isinstance(rrc.interpolation, (list, tuple))
    assert len(rrc.interpolation) == 2 and recipe['eval']['interpolation'] == 'bicubic'


def test_repeated_augmentation_sampler():
    """--aug-repeats 3 (DeiT's RASampler): each image's copies go to different ranks with different augmentations;
    every rank takes len // 256 * 256 / world samples; resuming mid-epoch skips exactly the trained prefix."""
    from vitzoo.train_utils import ResumableSampler, SeededDataset
    n, world = 600, 4
    ranks = [ResumableSampler(n, r, world, seed=3, num_repeats=3) for r in range(world)]
    for s in ranks:
        s.set_epoch(2)
    shares = [list(s) for s in ranks]
    assert [len(s) for s in ranks] == [len(x) for x in shares] == [512 // world] * world
    seen = {}
    for r, share in enumerate(shares):
        for v in share:
            seen.setdefault(v % n, []).append((r, v))
    copies = [c for c in seen.values() if len(c) > 1]
    assert copies and all(len({r for r, _ in c}) == len(c) for c in copies)  # copies on different ranks
    assert all(len({v for _, v in c}) == len(c) for c in copies)  # ... as different virtual indices
    assert max(len(c) for c in seen.values()) == 3
    rank0 = ResumableSampler(n, 0, world, seed=3, num_repeats=3)
    rank0.set_epoch(2)
    rank0.set_start(40)
    assert list(rank0) == shares[0][40:] and len(rank0) == len(shares[0]) - 40

    class Noise(torch.utils.data.Dataset):  # "augmentation" = a fresh random draw per load
        def __len__(self):
            return n

        def __getitem__(self, i):
            return i, torch.rand(3)
    ds = SeededDataset(Noise(), seed=3)
    (r0, v0), (r1, v1) = copies[0][:2]
    (i0, x0), (i1, x1) = ds[v0], ds[v1]
    assert i0 == i1 == v0 % n and not torch.equal(x0, x1)  # same image, different augmentation
    assert torch.equal(ds[v0][1], x0)  # and reproducible
    with pytest.raises(ValueError, match='num_repeats'):
        ResumableSampler(n, num_repeats=0)


def _lr_per_iteration(config: str, iters: int) -> tuple:
    """The lr of every iteration as tools/train.py's loop sets it (scheduler.step(epoch), then step_update)."""
    args = train.parse_args(['-c', str(ROOT / 'configs' / 'train' / f'{config}.yaml'), '--world-size', '8'])
    args.world_size = 8
    recipe = train.resolve_recipe(args)
    opt = train.build_optimizer(torch.nn.Linear(1, 1), args, recipe['lr'])
    sched, epochs = train.build_scheduler(opt, args, recipe, iters)
    lrs, updates = [], 0
    for epoch in range(epochs):
        sched.step(epoch)
        sched.step_update(updates)
        for _ in range(iters):
            lrs.append(opt.param_groups[0]['lr'])
            updates += 1
            sched.step_update(updates)
    return recipe, epochs, lrs


@pytest.mark.parametrize('config,base,final,total,warm', [
    ('sparsifiner_deit_small_phase1', 3e-4, 2e-4, 5, 3), ('sparsifiner_deit_small_phase2', 8e-5, 2e-6, 45, 3)])
def test_sparsifiner_schedule_is_the_official_per_iteration_cosine(config, base, final, total, warm):
    """Sparsifiner src/utils.py cosine_scheduler, set every iteration: np.linspace(0, BASE_LR) over the warmup, then
    a cosine from BASE_LR to FINAL_LR over the remaining iterations (epoch 0 is not spent at the warmup lr)."""
    import math
    import numpy as np
    iters = 7
    recipe, epochs, ours = _lr_per_iteration(config, iters)
    assert epochs == total and len(ours) == total * iters
    w = warm * iters  # the official schedule, re-stated from src/utils.py
    rest = np.arange(total * iters - w)
    official = np.concatenate([np.linspace(0, base, w),
                               [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / len(rest))) for i in rest]])
    np.testing.assert_allclose(ours[w:], official[w:], rtol=1e-12, atol=0)
    np.testing.assert_allclose(ours[:w], base * np.arange(w) / w, rtol=1e-12, atol=0)  # timm's warmup ...
    assert np.abs(np.array(ours[:w]) - official[:w]).max() <= base / (w - 1)  # ... one warmup step from linspace
    assert ours[1] > ours[0] == 0.0 and ours[iters] > ours[iters - 1]  # rises within epoch 0 and across epochs


# ---- --patch-aug: TAP-ADL's patch-wise augmentation (a second forward / backward before the normal one) ------------

RVT_TINY = dict(img_size=32, base_dims=[16], depth=[2], heads=[2])  # 2x2 patches of 16 px at 32 px


def _spy_patch_aug(monkeypatch, records: dict) -> None:
    """Record what the run's patch augmentation and classification loss see (the real ones still run)."""
    real_build, real_loss = train.build_patch_aug, train.build_method_loss

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            out = self.inner(x)
            records.setdefault('x', []).append(x.detach().cpu().clone())
            records.setdefault('x_aug', []).append(out.detach().cpu().clone())
            return out

    class TargetSpy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, logits, target):
            records.setdefault('y', []).append(target.detach().cpu().clone())
            return self.inner(logits, target)

    def build_loss(args, model, cls_loss):
        return real_loss(args, model, TargetSpy(cls_loss))

    monkeypatch.setattr(train, 'build_patch_aug', lambda *a: Spy(real_build(*a)))
    monkeypatch.setattr(train, 'build_method_loss', build_loss)


def test_patch_aug_step_applies_the_sum_of_both_gradients(data, tmp_path, monkeypatch):
    """One SGD step (lr 1, no momentum / decay / clipping) moves every weight by -(g_aug + g_main): g_aug of the
    classification loss on the patch-augmented copy (same targets, no ADL), g_main of cls + ADL on the batch."""
    from vitzoo.losses.adl import AttentionDiversificationLoss
    records = {}
    _spy_patch_aug(monkeypatch, records)
    init = _tiny_ckpt(tmp_path, 'tap_rvt_tiny', **RVT_TINY)
    out = train.main(['--data-dir', str(data), '--model', 'tap_rvt_tiny', '--img-size', '32', '--model-kwargs',
                      'base_dims=[16]', 'depth=[2]', 'heads=[2]', '--initial-checkpoint', init, '--threads', '1',
                      '-j', '0', '-b', '16', '--crop-pct', '1.0', '--no-aug', '--smoothing', '0', '--opt', 'momentum',
                      '--momentum', '0', '--weight-decay', '0', '--lr', '1.0', '--warmup-epochs', '0',
                      '--epochs', '1', '--max-steps-per-epoch', '1', '--adl-threshold', '0.5', '--patch-aug',
                      '--seed', '5', '--output', str(tmp_path), '--experiment', 'sum'])
    x, x_aug = records['x'][0], records['x_aug'][0]
    y_aug, y_main = records['y'][:2]  # the augmented pass first, then the normal one, same targets
    assert len(records['x']) == 1 and torch.equal(y_aug, y_main)
    assert not torch.equal(x, x_aug) and x.shape == x_aug.shape  # some of the 64 patches were augmented

    before = _load(init)['model']
    after = _load(Path(out['output_dir']) / 'last.pth')['model']
    model = timm.create_model('tap_rvt_tiny', num_classes=4, **RVT_TINY)
    model.load_state_dict(before)
    model.train()
    params = dict(model.named_parameters())

    def grads(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(params.values()))])

    g_aug = grads(torch.nn.functional.cross_entropy(model(x_aug), y_aug))
    logits, attn = model(x, return_attn=True)
    adl = AttentionDiversificationLoss(1.0, 0.5)(attn)
    assert adl.item() > 0
    g_main = grads(torch.nn.functional.cross_entropy(logits, y_main) + adl)
    step = torch.cat([(before[k] - after[k]).flatten() for k in params])  # = lr * summed gradient, lr 1
    tol = 1e-5 * (g_aug + g_main).abs().max().item()
    assert (step - (g_aug + g_main)).abs().max().item() <= tol
    assert (step - g_main).abs().max().item() > 100 * tol  # the augmented pass really contributed
    assert (step - 2 * g_main).abs().max().item() > 100 * tol  # ... with the augmented images, not the batch


def test_patch_aug_run_logs_its_loss_and_checks_inputs(data, tmp_path, capsys):
    """A tiny --patch-aug run on the shapes data trains and logs patch_aug_loss; the recipe shows patch_aug."""
    base = ['--data-dir', str(data), '--model', 'tap_rvt_tiny', '--img-size', '32', '--model-kwargs',
            'base_dims=[16]', 'depth=[2]', 'heads=[2]', *FAST, '--epochs', '1', '--max-steps-per-epoch', '2',
            '--mixup', '0.8', '--cutmix', '1.0', '--adl-threshold', '0.5', '--output', str(tmp_path),
            '--log-interval', '1']
    out = train.main(base + ['--patch-aug', '--experiment', 'run'])
    log = capsys.readouterr().err
    row = _rows(out['output_dir'])[0]
    assert 'patch_aug_loss=' in log and 0 < float(row['train_patch_aug_loss']) < 10
    assert float(row['train_cls_loss']) > 0 and float(row['train_adl_loss']) > 0
    recipe = train.main(base + ['--patch-aug', '--print-recipe'])
    assert recipe['patch_aug'] is True and train.main(base + ['--print-recipe'])['patch_aug'] is False
    with pytest.raises(TrainError, match='--patch-aug .* for --method adl or none, not .sat.'):
        train.main(base + ['--patch-aug', '--method', 'sat', '--print-recipe'])
    with pytest.raises(TrainError, match="--patch-aug cuts images into the model's 16x16 patches: the image size 40"):
        train.main([*base, '--img-size', '40', '--patch-aug', '--experiment', 'bad'])
    with pytest.raises(TrainError, match='--patch-aug: ResNet has no patch size'):
        train.main([*base, '--model', 'resnet18', '--model-kwargs', '--method', 'none', '--patch-aug',
                    '--experiment', 'bad2'])


def test_tap_rvt_configs_train_with_patch_aug():
    """TAPADL_RVT/README.md trains RVT-B* with --use_patch_aug; the other sizes reuse that command."""
    for f in sorted((ROOT / 'configs' / 'train').glob('tap_*.yaml')):
        args = train.parse_args(['-c', str(f)])
        assert train.resolve_recipe(args)['patch_aug'] is f.stem.startswith('tap_rvt_'), f.stem


def test_patch_aug_under_ddp_keeps_ranks_equal(data, tmp_path):
    """Two gloo processes with --patch-aug: the augmented backward runs under no_sync and the normal one all-reduces
    the sum, so both ranks (which augment differently) end with the same weights. (BatchNorm running statistics are
    rank-local after the last forward: DDP broadcasts rank 0's buffers at the start of each forward.)"""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(TRAIN),
           '--data-dir', str(data), '--model', 'tap_rvt_tiny', '--img-size', '32', '--model-kwargs', 'base_dims=[16]',
           'depth=[2]', 'heads=[2]', *FAST, '--epochs', '1', '--max-steps-per-epoch', '2', '--patch-aug',
           '--output', str(tmp_path), '--experiment', 'ddp', '--debug-dump-rank-params']
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / 'ddp'
    p0, p1 = _load(out / 'rank0_params.pth'), _load(out / 'rank1_params.pth')
    assert _load(out / 'last.pth')['args']['patch_aug'] is True and p0.keys() == p1.keys()
    weights = [k for k in p0 if not k.rsplit('.', 1)[-1].startswith(('running_', 'num_batches'))]
    assert len(weights) > 20 and all(torch.equal(p0[k], p1[k]) for k in weights)
    assert 'train_patch_aug_loss' in _rows(out)[0]
