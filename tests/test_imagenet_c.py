"""ImageNet-C: mCE / relative mCE, the corruption protocol and writer, tools/eval_imagenet_c.py end to end."""
import argparse
import csv
import importlib.util
import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitzoo.data.imagenet_c import (CorruptedImageDataset, ImageNetCError, corrupt_image, imagenet_c_protocol,
                                    imagenet_subset_info, load_imagecorruptions, scan_image_folder, write_imagenet_c)
from vitzoo.data.shapes import write_image_folder
from vitzoo.metrics import ALEXNET_ERR, ALL_CORRUPTIONS, CORRUPTIONS, imagenet_c_summary

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / 'tools' / 'eval_imagenet_c.py'
CROP, RESIZE, NUM_CLASSES = 32, 36, 4


def _load_tool():
    spec = importlib.util.spec_from_file_location('eval_imagenet_c', TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope='module')
def tool():
    return _load_tool()


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    # the test machine's cores are shared: oversubscribed intra-op threads make tiny convs 50x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """Shapes val folder (4 classes x 2 images), the full 19 x 5 ImageNet-C tree made from it, a test_vit checkpoint."""
    base = tmp_path_factory.mktemp('inc')
    write_image_folder(base / 'shapes', num_train=NUM_CLASSES, num_val=2 * NUM_CLASSES, num_classes=NUM_CLASSES,
                       img_size=40, seed=0, progress=False)
    write_imagenet_c(base / 'shapes' / 'val', base / 'tree', resize=RESIZE, crop=CROP, seed=0)
    torch.manual_seed(0)
    import timm
    model = timm.create_model('test_vit', num_classes=NUM_CLASSES)
    torch.save({'state_dict': model.state_dict(), 'epoch': 3}, base / 'ckpt.pth')
    return base


def _args(data, *extra):
    return ['--model', 'test_vit', '--checkpoint', str(data / 'ckpt.pth'), '--img-size', str(CROP), '--resize',
            str(RESIZE), '-j', '0', '-b', '4', '--no-progress', '--device', 'cpu', *extra]


def _hand_mce(errors, clean, alex_clean):
    ce, rce = [], []
    for c in CORRUPTIONS:
        e = errors[c]
        ce.append((e[1] + e[2] + e[3] + e[4] + e[5]) / (5 * ALEXNET_ERR[c]))
        rce.append((e[1] + e[2] + e[3] + e[4] + e[5] - 5 * clean) / (5 * ALEXNET_ERR[c] - 5 * alex_clean))
    return 100 * sum(ce) / 15, 100 * sum(rce) / 15


def test_mce_hand_computation_and_order_independence():
    rng = random.Random(0)
    errors = {c: {s: rng.uniform(0.2, 0.9) for s in range(1, 6)} for c in ALL_CORRUPTIONS}
    mce, rmce = _hand_mce(errors, 0.25, 0.435)
    s = imagenet_c_summary(errors, clean_error=0.25, alexnet_clean_error=0.435)
    assert s['complete'] and s['mce'] == pytest.approx(mce, abs=1e-9)
    assert s['relative_mce'] == pytest.approx(rmce, abs=1e-9)
    assert set(s['ce']) == set(CORRUPTIONS)  # the 4 extra corruptions are not in mCE
    cells = [e for c in errors for e in errors[c].values()]
    assert s['mean_corruption_accuracy'] == pytest.approx(100 * (1 - sum(cells) / len(cells)))
    # a reordered corruption list (and reordered severities) gives the same numbers: constants keyed by name
    names = list(errors)
    rng.shuffle(names)
    shuffled = {c: dict(reversed(list(errors[c].items()))) for c in names}
    s2 = imagenet_c_summary(shuffled, clean_error=0.25, alexnet_clean_error=0.435)
    assert s2['mce'] == s['mce'] and s2['relative_mce'] == s['relative_mce'] and s2['ce'] == s['ce']
    # one known CE by hand: constant error 0.5 on brightness -> 0.5 / 0.564592
    assert imagenet_c_summary({'brightness': {k: 0.5 for k in range(1, 6)}})['ce']['brightness'] == \
        pytest.approx(100 * 0.5 / 0.564592)
    # incomplete tables: no mCE, but a partial one; unknown names are rejected
    del errors['fog'][3]
    s3 = imagenet_c_summary(errors)
    assert s3['mce'] is None and s3['missing'] == ['fog'] and s3['mce_partial'] is not None
    with pytest.raises(KeyError, match='unknown corruptions'):
        imagenet_c_summary({'fogg': {1: 0.1}})


def test_corruptions_all_work_and_are_deterministic(data):
    load_imagecorruptions()
    img = np.random.RandomState(1).randint(0, 256, (CROP, CROP, 3), dtype=np.uint8)
    state = np.random.get_state()
    for c in ALL_CORRUPTIONS:  # incl. glass_blur / gaussian_blur / fog that need the compatibility shim
        a = corrupt_image(img, c, 3, seed=7, index=2)
        assert a.shape == img.shape and a.dtype == np.uint8
        assert np.array_equal(a, corrupt_image(img, c, 3, seed=7, index=2)), c
    assert np.array_equal(np.random.get_state()[1], state[1])  # the global RNG is left untouched
    assert not np.array_equal(corrupt_image(img, 'gaussian_noise', 3, seed=7, index=2),
                              corrupt_image(img, 'gaussian_noise', 3, seed=7, index=3))
    # on the fly == written tree (JPEG q85 included), whatever the order of access
    classes, samples = scan_image_folder(data / 'shapes' / 'val')
    ds = CorruptedImageDataset(samples, lambda im: torch.from_numpy(np.asarray(im).copy()), (CROP, CROP, 3),
                               'frost', 2, seed=0, resize=RESIZE, crop=CROP)
    for i in (5, 0):
        path, label = samples[i]
        written = data / 'tree' / 'frost' / '2' / classes[label] / (Path(path).stem + '.JPEG')
        x, y, idx = ds[i]
        assert y == label and idx == i
        assert np.array_equal(x.numpy(), np.asarray(Image.open(written).convert('RGB')))
    jpeg = imagenet_c_protocol(Image.open(samples[0][0]), 'fog', 5, resize=RESIZE, crop=CROP)
    assert Image.open(io.BytesIO(jpeg)).size == (CROP, CROP)
    with pytest.raises(ImageNetCError, match='unknown corruption'):
        corrupt_image(img, 'rain', 1)
    with pytest.raises(ImageNetCError, match='severity'):
        corrupt_image(img, 'fog', 6)


def test_end_to_end_full_tree_resume_and_compare(tool, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'out'
    args = _args(data, '--data-dir', str(data / 'tree'), '--clean-dir', str(data / 'shapes' / 'val'),
                 '--output', str(out))
    real = tool._evaluate_loader
    calls = []

    def interrupted(*a, **kw):
        if len(calls) == 10:  # clean + 9 cells done, then "Ctrl-C"
            raise KeyboardInterrupt
        calls.append(kw.get('desc'))
        return real(*a, **kw)
    monkeypatch.setattr(tool, '_evaluate_loader', interrupted)
    with pytest.raises(KeyboardInterrupt):
        tool.main(args)
    assert len(list((out / 'cells').glob('*.json'))) == 10

    calls2 = []

    def counting(*a, **kw):
        calls2.append(kw.get('desc'))
        return real(*a, **kw)
    monkeypatch.setattr(tool, '_evaluate_loader', counting)
    res = tool.main(args)
    assert res['cells_reused'] == 9 and res['cells_evaluated'] == 95 - 9
    assert 'clean' not in calls2 and not set(calls2) & set(calls[1:])  # finished cells were not re-evaluated

    rows = list(csv.DictReader(open(out / 'results.csv')))
    assert len(rows) == 19 * 5
    assert {(r['corruption'], int(r['severity'])) for r in rows} == {(c, s) for c in ALL_CORRUPTIONS
                                                                    for s in range(1, 6)}
    assert all(int(r['images']) == 2 * NUM_CLASSES and int(r['skipped']) == 0 for r in rows)
    summary = json.loads((out / 'summary.json').read_text())
    errors = {}
    for r in rows:
        errors.setdefault(r['corruption'], {})[int(r['severity'])] = float(r['top1_err']) / 100
    mce, rmce = _hand_mce(errors, summary['clean']['top1_err'] / 100, 0.435)
    assert summary['metrics']['mce'] == pytest.approx(mce, abs=1e-3)
    assert summary['metrics']['relative_mce'] == pytest.approx(rmce, abs=1e-3)
    assert summary['protocol'] == 'crop' and 'CenterCrop(32)' in summary['protocol_description']
    assert summary['images_per_s'] > 0
    with Image.open(out / 'ce.png') as im:
        im.verify()
        assert im.format == 'PNG' and im.size[0] > 100
    assert 'mCE' in capsys.readouterr().out

    # rerun: nothing evaluated, same numbers
    calls2.clear()
    res3 = tool.main(args)
    assert calls2 == [] and res3['cells_evaluated'] == 0 and res3['metrics']['mce'] == res['metrics']['mce']
    # other settings in the same output folder are refused
    with pytest.raises(SystemExit, match='other settings'):
        tool.main(args + ['--protocol', 'resize'])

    # comparison chart of two result files
    other = tmp_path / 'other.json'
    s2 = dict(summary, model='other')
    s2['metrics'] = dict(summary['metrics'], ce={k: v * 0.9 for k, v in summary['metrics']['ce'].items()})
    other.write_text(json.dumps(s2))
    tool.main(['--compare', str(out / 'summary.json'), str(other), '--output', str(tmp_path / 'cmp')])
    with Image.open(tmp_path / 'cmp' / 'ce_compare.png') as im:
        im.verify()
        assert im.format == 'PNG'


def test_on_the_fly_equals_written_tree(tool, data, tmp_path):
    sel = ['--corruptions', 'gaussian_noise', 'frost', '--severities', '1', '5']
    a = tool.main(_args(data, '--data-dir', str(data / 'tree'), '--clean-error', '30', *sel))
    b = tool.main(_args(data, '--generate-from', str(data / 'shapes' / 'val'), '--no-clean', *sel))
    assert b['source'] == 'on-the-fly' and a['source'] == 'tree'
    key = ('corruption', 'severity', 'images', 'top1_err', 'top5_err')
    assert [{k: r[k] for k in key} for r in a['rows']] == [{k: r[k] for k in key} for r in b['rows']]
    assert a['metrics']['mce'] is None and len(a['metrics']['missing']) == 15  # 2 severities only: no CE / mCE

    # the checkpoint is really used (a training checkpoint with argparse args, loaded weights_only): zero weights and
    # a head bias favouring class 2 predict class 2 everywhere -> top-1 = the class-2 share = 25 %
    import timm
    model = timm.create_model('test_vit', num_classes=NUM_CLASSES)
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    sd['head.bias'] = torch.tensor([0.0, 0.0, 9.0, 0.0])
    torch.save({'state_dict': sd, 'args': argparse.Namespace(lr=0.1)}, tmp_path / 'const.pth')
    args = _args(data, '--data-dir', str(data / 'tree'), *sel)
    args[args.index('--checkpoint') + 1] = str(tmp_path / 'const.pth')
    assert {r['top1_acc'] for r in tool.main(args)['rows']} == {100.0 / NUM_CLASSES}
    sd['head.weight'] = torch.zeros(7, sd['head.weight'].shape[1])
    torch.save(sd, tmp_path / 'bad.pth')
    args[args.index('--checkpoint') + 1] = str(tmp_path / 'bad.pth')
    with pytest.raises(SystemExit, match='cannot load the weights'):
        tool.main(args)
    args[args.index('--checkpoint') + 1] = str(tmp_path / 'missing.pth')
    with pytest.raises(SystemExit, match='checkpoint not found'):
        tool.main(args)


def test_torchrun_two_processes_match_single(tool, data, tmp_path):
    sel = ['--corruptions', 'shot_noise', 'contrast', 'pixelate', '--severities', '2', '4', '--clean-dir',
           str(data / 'shapes' / 'val')]
    single = tool.main(_args(data, '--data-dir', str(data / 'tree'), *sel))
    torchrun = Path(sys.executable).with_name('torchrun')
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    # the 2 ranks also write the tree (each every 2nd image) before evaluating it
    cmd = [str(torchrun), '--nproc_per_node', '2', '--master_port', str(29500 + os.getpid() % 1000), str(TOOL),
           *_args(data, '--generate-from', str(data / 'shapes' / 'val'), '--write', str(tmp_path / 'tree'), *sel,
                  '--output', str(tmp_path / 'ddp'), '-b', '3')]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    ddp = json.loads((tmp_path / 'ddp' / 'summary.json').read_text())
    assert ddp['world_size'] == 2 and ddp['write']['written'] == 3 * 2 * 2 * NUM_CLASSES
    for f in (data / 'tree' / 'contrast' / '4').rglob('*.JPEG'):  # same bytes as the single-process writer
        assert f.read_bytes() == (tmp_path / 'tree' / 'contrast' / '4' / f.relative_to(data / 'tree' / 'contrast' /
                                                                                       '4')).read_bytes()
    key = ('corruption', 'severity', 'images', 'top1_err', 'top5_err')
    assert [{k: r[k] for k in key} for r in ddp['rows']] == [{k: r[k] for k in key} for r in single['rows']]
    assert ddp['clean']['top1_err'] == single['clean']['top1_err']
    assert ddp['clean']['images'] == 2 * NUM_CLASSES


def _small_tree(data, dst, corruptions=('gaussian_noise', 'fog')):
    for c in corruptions:
        shutil.copytree(data / 'tree' / c, dst / c)
    return dst


def test_bad_inputs(tool, data, tmp_path):
    tree = _small_tree(data, tmp_path / 'tree')
    # missing corruption folders: the default asks for all 15, an explicit name must exist
    with pytest.raises(SystemExit, match='missing corruption folders.*shot_noise'):
        tool.main(_args(data, '--data-dir', str(tree)))
    with pytest.raises(SystemExit, match='missing corruption folder.*snow'):
        tool.main(_args(data, '--data-dir', str(tree), '--corruptions', 'fog', 'snow'))
    # class folders that do not match the model
    with pytest.raises(SystemExit, match="does not match the model's classes"):
        tool.main(_args(data, '--data-dir', str(tree), '--corruptions', 'fog', '--num-classes', '5'))
    # a severity folder whose class set differs from the others
    cls = sorted(os.listdir(tree / 'fog' / '3'))[0]
    shutil.move(str(tree / 'fog' / '3' / cls), str(tree / 'fog' / '3' / 'zz_other'))
    with pytest.raises(SystemExit, match='differ from the reference classes'):
        tool.main(_args(data, '--data-dir', str(tree), '--corruptions', 'fog'))
    # empty severity folder
    for f in (tree / 'gaussian_noise' / '2').rglob('*.JPEG'):
        f.unlink()
    with pytest.raises(SystemExit, match='gaussian_noise severity 2 folder .* contains no images'):
        tool.main(_args(data, '--data-dir', str(tree), '--corruptions', 'gaussian_noise'))
    shutil.rmtree(tree / 'gaussian_noise' / '2')
    with pytest.raises(SystemExit, match='missing severity folder'):
        tool.main(_args(data, '--data-dir', str(tree), '--corruptions', 'gaussian_noise'))
    # an unreadable JPEG: counted, reported skip (or an error with --fail-on-broken)
    bad = sorted((tree / 'gaussian_noise' / '4').rglob('*.JPEG'))[1]
    bad.write_bytes(b'not a jpeg at all')
    res = tool.main(_args(data, '--data-dir', str(tree), '--corruptions', 'gaussian_noise', '--severities', '4',
                          '--output', str(tmp_path / 'out')))
    row = res['rows'][0]
    assert row['skipped'] == 1 and row['images'] == 2 * NUM_CLASSES - 1 and row['skipped_files'] == [str(bad)]
    assert res['skipped'] == 1
    assert list(csv.DictReader(open(tmp_path / 'out' / 'results.csv')))[0]['skipped'] == '1'
    with pytest.raises(SystemExit, match='unreadable'):
        tool.main(_args(data, '--data-dir', str(tree), '--corruptions', 'gaussian_noise', '--severities', '4',
                        '--fail-on-broken'))
    # unknown names, bad severities, --write without a source
    with pytest.raises(SystemExit, match='unknown corruptions'):
        tool.main(_args(data, '--data-dir', str(tree), '--corruptions', 'rain'))
    with pytest.raises(SystemExit, match='severities'):
        tool.main(_args(data, '--data-dir', str(tree), '--corruptions', 'fog', '--severities', '0'))
    with pytest.raises(SystemExit, match='--write needs --generate-from'):
        tool.main(_args(data, '--write', str(tmp_path / 'w')))


def test_write_cli_resumes_and_imagenet_r_subset(tool, data, tmp_path, monkeypatch):
    w = ['--generate-from', str(data / 'shapes' / 'val'), '--write', str(tmp_path / 'c'), '--img-size', str(CROP),
         '--resize', str(RESIZE), '--corruptions', 'snow', '--severities', '1', '-j', '0', '--no-progress']
    r1 = tool.main(w)
    r2 = tool.main(w)
    assert r1['write']['written'] == 2 * NUM_CLASSES and r2['write']['written'] == 0
    assert r2['write']['existing'] == 2 * NUM_CLASSES
    with pytest.raises(SystemExit, match='other parameters'):
        tool.main(w[:-7] + ['--resize', str(RESIZE + 4), '--corruptions', 'snow', '-j', '0'])

    # ImageNet-R: class folders are wnids of the 200-class list; labels = positions in it, logits masked to 200
    wnids, idx1k = imagenet_subset_info('imagenet-r')
    assert len(wnids) == 200 and len(set(idx1k)) == 200 and max(idx1k) < 1000
    root = tmp_path / 'imagenet-r'
    _, samples = scan_image_folder(data / 'shapes' / 'val')
    for k, wnid in enumerate((wnids[3], wnids[150])):
        (root / wnid).mkdir(parents=True)
        shutil.copy(samples[k][0], root / wnid / 'a.png')
    res = tool.main(['--subset', 'imagenet-r', '--data-dir', str(root), '--model', 'test_vit', '--img-size', '32',
                     '-j', '0', '--no-progress', '--device', 'cpu', '--output', str(tmp_path / 'r')])
    assert res['images'] == 2 and res['classes_present'] == 2 and 0 <= res['top1_acc'] <= 100
    assert json.loads((tmp_path / 'r' / 'summary.json').read_text())['subset'] == 'imagenet-r'

    # the logit mask: a model that always scores 1k class idx1k[3] (= wnids[3]) high and a class outside the 200
    # higher still must get exactly the wnids[3] image right (top-1 50 %); top-5 over 200 classes sees both
    class Const(torch.nn.Module):
        def forward(self, x):
            z = torch.zeros(x.shape[0], 1000)
            z[:, idx1k[3]] = 5.0
            z[:, idx1k[150]] = 4.0
            z[:, next(i for i in range(1000) if i not in idx1k)] = 9.0
            return z
    monkeypatch.setattr(tool, '_create_model', lambda *a, **kw: Const())
    res = tool.main(['--subset', 'imagenet-r', '--data-dir', str(root), '--model', 'test_vit', '--img-size', '32',
                     '-j', '0', '--no-progress', '--device', 'cpu'])
    assert res['top1_acc'] == 50.0 and res['top5_acc'] == 100.0
    monkeypatch.undo()
    (root / 'n00000000').mkdir()
    shutil.copy(samples[0][0], root / 'n00000000' / 'b.png')
    with pytest.raises(SystemExit, match='not among the 200 imagenet-r wnids'):
        tool.main(['--subset', 'imagenet-r', '--data-dir', str(root), '--model', 'test_vit', '--img-size', '32',
                   '-j', '0', '--no-progress', '--device', 'cpu'])


# ---- preprocessing: clean / -A / -R use the model's own eval transform (crop_pct, crop_mode, interpolation) -------
def _odd_images(root, classes, size=(57, 41)):
    """One non-square image per class folder (squash and center modes give different crops)."""
    rng = np.random.RandomState(3)
    for c in classes:
        (root / c).mkdir(parents=True)
        Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / c / 'x.png')
    return scan_image_folder(root)[1]


class _Recorder(torch.nn.Module):
    """Returns constant logits and keeps every input batch."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes, self.seen = num_classes, []

    def forward(self, x):
        self.seen.append(x.clone())
        return torch.zeros(x.shape[0], self.num_classes)


def _reference(resize, crop, interp, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    from torchvision import transforms as T
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode(interp)), T.CenterCrop(crop), T.ToTensor(),
                      T.Normalize(mean, std)])


@pytest.mark.parametrize('name', ['agent_deit_small', 'agent_swin_small_288', 'tap_fan_base_16_p4_hybrid',
                                  'tap_rvt_base_plus', 'sat_deit_small', 'test_vit'])
def test_model_eval_transform_equals_timm_create_transform(tool, name):
    import timm
    from timm.data import create_transform, resolve_data_config
    cfg = timm.get_pretrained_cfg(name)
    d = resolve_data_config({}, pretrained_cfg=cfg.to_dict())
    ours, desc = tool.model_eval_transform(d['input_size'][-1], d['crop_pct'], d['crop_mode'], d['interpolation'],
                                           d['mean'], d['std'])
    assert desc.startswith(d['crop_mode'])
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (301, 457, 3), dtype=np.uint8))
    for im in (img, img.transpose(Image.Transpose.TRANSPOSE)):
        assert torch.equal(ours(im), create_transform(**d)(im)), name
    for mode in ('center', 'border'):  # every mode is timm's, also when overridden
        ours, _ = tool.model_eval_transform(d['input_size'][-1], d['crop_pct'], mode, d['interpolation'], d['mean'],
                                            d['std'])
        assert torch.equal(ours(img), create_transform(**dict(d, crop_mode=mode))(img)), (name, mode)
    with pytest.raises(ImageNetCError, match='crop mode'):
        tool.model_eval_transform(224, 0.875, 'warp', 'bicubic', d['mean'], d['std'])
    with pytest.raises(ImageNetCError, match='crop-pct'):
        tool.model_eval_transform(224, 1.5, 'center', 'bicubic', d['mean'], d['std'])


def test_subset_and_clean_images_go_through_the_model_transform(tool, data, tmp_path, monkeypatch):
    wnids, _ = imagenet_subset_info('imagenet-r')
    root = tmp_path / 'imagenet-r'
    samples = _odd_images(root, [wnids[0], wnids[7]], size=(301, 233))
    rec = _Recorder(1000)
    monkeypatch.setattr(tool, '_create_model', lambda *a, **kw: rec)
    base = ['--subset', 'imagenet-r', '--data-dir', str(root), '-j', '0', '--no-progress', '--device', 'cpu']
    imgs = [Image.open(p).convert('RGB') for p, _ in samples]

    def seen_equals(ref):
        x = torch.cat(rec.seen)
        rec.seen.clear()
        assert torch.allclose(x, torch.stack([ref(im) for im in imgs]), rtol=0, atol=1e-6)

    # Agent: the official squash, Resize((256, 256)) -> CenterCrop(224), bicubic
    res = tool.main(base + ['--model', 'agent_deit_small'])
    seen_equals(_reference((256, 256), 224, 'bicubic'))
    assert res['protocol'] == 'model' and res['protocol_description'].startswith('squash: Resize((256, 256), bicubic)')
    # Agent-Swin-S-288 (TEST.CROP False): Resize((288, 288)) only
    tool.main(base + ['--model', 'agent_swin_small_288'])
    seen_equals(_reference((288, 288), 288, 'bicubic'))
    # TAP-FAN (crop_pct 1.0, aspect kept) and TAP-RVT (Resize(256) of the shorter side)
    tool.main(base + ['--model', 'tap_fan_base_16_p4_hybrid'])
    seen_equals(_reference(224, 224, 'bicubic'))
    tool.main(base + ['--model', 'tap_rvt_base_plus'])
    seen_equals(_reference(256, 224, 'bicubic'))
    # the flags override the cfg
    tool.main(base + ['--model', 'agent_deit_small', '--crop-mode', 'center', '--crop-pct', '1.0', '--interpolation',
                      'bilinear'])
    seen_equals(_reference(224, 224, 'bilinear'))
    tool.main(base + ['--model', 'agent_deit_small', '--resize', '240'])
    seen_equals(_reference((240, 240), 224, 'bicubic'))
    with pytest.raises(SystemExit, match='crop-pct'):
        tool.main(base + ['--model', 'agent_deit_small', '--crop-pct', '0'])

    # ImageNet-C: clean images through the model transform, the released images through CenterCrop only
    classes = sorted(os.listdir(data / 'tree' / 'fog' / '1'))
    clean = _odd_images(tmp_path / 'clean', classes, size=(47, 37))
    rec4 = _Recorder(NUM_CLASSES)
    monkeypatch.setattr(tool, '_create_model', lambda *a, **kw: rec4)
    res = tool.main(['--data-dir', str(data / 'tree'), '--corruptions', 'fog', '--severities', '1', '--clean-dir',
                     str(tmp_path / 'clean'), '--model', 'agent_deit_small', '--img-size', '32', '-j', '0', '-b', '4',
                     '--no-progress', '--device', 'cpu'])
    n_clean = len(clean)
    x = torch.cat(rec4.seen)
    ref = _reference((36, 36), 32, 'bicubic')  # floor(32 / 0.875) = 36, squash
    assert torch.allclose(x[:n_clean], torch.stack([ref(Image.open(p).convert('RGB')) for p, _ in clean]), atol=1e-6)
    _, cell = scan_image_folder(data / 'tree' / 'fog' / '1')
    crop_only = _reference(32, 32, 'bicubic')  # a 32x32 image: Resize(32) is the identity, so this is CenterCrop
    assert torch.allclose(x[n_clean:], torch.stack([crop_only(Image.open(p).convert('RGB')) for p, _ in cell]),
                          atol=1e-6)
    assert res['clean_transform'].startswith('squash: Resize((36, 36), bicubic)')
    assert res['protocol_description'].startswith('hendrycks') and 'CenterCrop(32)' in res['protocol_description']


def test_help_documents_the_preprocessing_protocols(tool):
    text = tool.build_parser().format_help()
    for needle in ('--protocol crop', 'hendrycks', 'augmix', 'TAPADL', 'clean, -A, -R', '--crop-pct', '--crop-mode',
                   '--interpolation', 'make_imagenet_c.py'):
        assert needle in text, needle
