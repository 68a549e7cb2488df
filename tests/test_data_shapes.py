"""Tests for the procedural shapes demo dataset (vitzoo.data.shapes)."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitzoo.data import shapes
from vitzoo.data.shapes import (
    MAX_CLASSES, SHAPES, TEXTURES, ShapesDataset, ShapeSample, class_names, render_sample, write_image_folder,
)


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _assert_same_sample(a: ShapeSample, b: ShapeSample) -> None:
    assert a.label == b.label
    assert a.box == b.box
    assert a.image.tobytes() == b.image.tobytes()
    assert a.mask.tobytes() == b.mask.tobytes()
    assert a.background.tobytes() == b.background.tobytes()


# ---------------------------------------------------------------------------------------------------------------------
# classes


def test_class_names_default_and_mapping():
    names = class_names()
    assert len(names) == 10 and len(set(names)) == 10
    assert names[0] == 'circle_solid'
    # default classes: 10 distinct shapes, all solid
    assert [n.split('_')[0] for n in names] == list(SHAPES[:10])
    assert all(n.endswith('_solid') for n in names)


def test_class_names_many_classes_unique_prefix_stable_and_fs_safe():
    assert MAX_CLASSES >= 24
    all_names = class_names(MAX_CLASSES)
    assert len(set(all_names)) == MAX_CLASSES == len(SHAPES) * len(TEXTURES)
    assert all(re.fullmatch(r'[a-z0-9]+_[a-z0-9]+', n) for n in all_names)
    for k in (1, 10, 24, MAX_CLASSES):
        assert class_names(k) == all_names[:k]
    assert {n.split('_')[1] for n in class_names(24)} >= {'solid', 'stripes'}


def test_sample_label_matches_shape_and_texture():
    for i in range(2 * MAX_CLASSES):
        s = render_sample(i, num_classes=MAX_CLASSES, img_size=64)
        assert s.label == i % MAX_CLASSES
        colours = np.unique(s.image[s.mask].reshape(-1, 3), axis=0)
        texture = class_names(MAX_CLASSES)[s.label].split('_')[1]
        # solid objects are one flat colour; textured ones show both texture colours
        assert len(colours) == (1 if texture == 'solid' else 2), (i, texture, len(colours))


# ---------------------------------------------------------------------------------------------------------------------
# determinism


def test_render_is_deterministic_and_seed_dependent():
    a = render_sample(5, num_classes=10, img_size=96, seed=3)
    np.random.seed(123)  # global RNG state must not matter
    torch.manual_seed(7)
    _ = np.random.rand(10)
    b = render_sample(5, num_classes=10, img_size=96, seed=3)
    _assert_same_sample(a, b)

    other_seed = render_sample(5, num_classes=10, img_size=96, seed=4)
    assert other_seed.label == a.label
    assert other_seed.image.tobytes() != a.image.tobytes()
    other_split = render_sample(5, num_classes=10, img_size=96, seed=3, split='val')
    assert other_split.image.tobytes() != a.image.tobytes()
    other_index = render_sample(15, num_classes=10, img_size=96, seed=3)
    assert other_index.label == a.label and other_index.image.tobytes() != a.image.tobytes()


def test_render_order_independent():
    idx = list(range(12))
    forward = {i: render_sample(i, img_size=64, seed=1) for i in idx}
    backward = {i: render_sample(i, img_size=64, seed=1) for i in reversed(idx)}
    for i in idx:
        _assert_same_sample(forward[i], backward[i])
    # images within one dataset are not all the same
    assert len({forward[i].image.tobytes() for i in idx}) == len(idx)


def test_dataloader_workers_match_serial():
    ds = ShapesDataset(num_samples=16, img_size=48, seed=2, transform=lambda im: torch.from_numpy(np.array(im)))
    serial = torch.stack([ds[i][0] for i in range(len(ds))])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    parallel = torch.cat([x for x, _ in loader])
    assert torch.equal(serial, parallel)


def test_same_scene_at_different_sizes():
    small, large = render_sample(7, img_size=64, seed=5), render_sample(7, img_size=128, seed=5)
    assert small.label == large.label
    # random choices are size independent, so the box scales with the image (up to rasterisation)
    np.testing.assert_allclose(np.array(large.box) / 2, np.array(small.box), atol=1.5)


# ---------------------------------------------------------------------------------------------------------------------
# geometry: box, mask and pixels agree


@pytest.mark.parametrize('img_size', [32, 64, (48, 96), (100, 40), 224])
def test_box_mask_and_pixels_agree(img_size):
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    for i in range(0, 96, 3):
        s = render_sample(i, num_classes=MAX_CLASSES, img_size=img_size, seed=11)
        assert s.image.shape == (h, w, 3) and s.image.dtype == np.uint8
        assert s.background.shape == (h, w, 3) and s.background.dtype == np.uint8
        assert s.mask.shape == (h, w) and s.mask.dtype == np.bool_
        assert s.mask.any()
        assert s.box == _tight_box(s.mask)
        x0, y0, x1, y1 = s.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        # object fully inside: it does not touch the image border
        assert x0 > 0 and y0 > 0 and x1 < w and y1 < h
        # outside the mask the image is exactly the background, inside it differs (almost) everywhere
        assert np.array_equal(s.image[~s.mask], s.background[~s.mask])
        differs = (s.image[s.mask] != s.background[s.mask]).any(axis=-1)
        assert differs.mean() >= 0.95
        # the object is clearly visible: mean colour distance to the background
        dist = np.abs(s.image[s.mask].astype(int) - s.background[s.mask].astype(int)).sum(-1)
        assert dist.mean() > 60


def test_object_scale_and_background_variety():
    sizes, bg_stds = [], []
    for i in range(60):
        s = render_sample(i, img_size=(96, 160), seed=0)
        x0, y0, x1, y1 = s.box
        sizes.append(max(x1 - x0, y1 - y0) / 96)
        bg_stds.append(s.background.reshape(-1, 3).std(0).sum())
    sizes = np.array(sizes)
    assert sizes.min() >= 0.12 and sizes.max() <= 0.75
    assert sizes.max() - sizes.min() > 0.3  # scale actually varies
    assert np.median(bg_stds) > 3  # backgrounds are not flat colours
    assert len({round(float(v), 3) for v in bg_stds}) > 50


def test_render_speed_224():
    render_sample(0, img_size=224)
    t0 = time.perf_counter()
    for i in range(20):
        render_sample(i, img_size=224)
    per_image = (time.perf_counter() - t0) / 20
    assert per_image < 0.05, f'{per_image * 1e3:.1f} ms per 224x224 image'


# ---------------------------------------------------------------------------------------------------------------------
# torch dataset


def test_dataset_basics():
    ds = ShapesDataset(num_samples=25, num_classes=5, img_size=(40, 56), seed=9, split='val')
    assert len(ds) == 25
    assert ds.classes == class_names(5)
    assert ds.targets == [i % 5 for i in range(25)]
    assert np.bincount(ds.targets).tolist() == [5] * 5
    img, label = ds[7]
    assert isinstance(img, Image.Image) and img.mode == 'RGB' and img.size == (56, 40)
    assert label == ds.targets[7] == 2
    ref = render_sample(7, num_classes=5, img_size=(40, 56), seed=9, split='val')
    assert np.array_equal(np.asarray(img), ref.image)
    assert np.array_equal(np.asarray(ds[-1][0]), np.asarray(ds[24][0]))
    with pytest.raises(IndexError):
        ds[25]


def test_dataset_transform_and_meta():
    from torchvision import transforms as T

    seen = []
    transform = T.Compose([T.Lambda(lambda im: seen.append(im.size) or im), T.Resize(32), T.ToTensor()])
    ds = ShapesDataset(num_samples=10, num_classes=10, img_size=64, seed=4, transform=transform, return_meta=True)
    x, label, meta = ds[3]
    assert seen == [(64, 64)]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 32, 32) and x.dtype == torch.float32
    ref = render_sample(3, num_classes=10, img_size=64, seed=4)
    expected = T.ToTensor()(Image.fromarray(ref.image).resize((32, 32), Image.BILINEAR))
    assert torch.allclose(x, expected, atol=2 / 255)
    # box and mask stay in the coordinates of the untransformed image
    assert label == ref.label == 3
    assert meta['box'] == ref.box
    assert np.array_equal(meta['mask'], ref.mask)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 3, 32, 32) and batch[1].tolist() == [0, 1, 2, 3]
    assert batch[2]['mask'].shape == (4, 64, 64)


# ---------------------------------------------------------------------------------------------------------------------
# ImageFolder export


def test_write_image_folder(tmp_path, monkeypatch):
    from torchvision.datasets import ImageFolder

    root = tmp_path / 'shapes'
    kw = dict(num_train=24, num_val=12, num_classes=6, img_size=(40, 48), seed=1, progress=False)
    out = write_image_folder(root, **kw)
    assert out == root and root.is_dir()
    names = class_names(6)

    for split, count in (('train', 24), ('val', 12)):
        folder = ImageFolder(str(root / split))
        assert folder.classes == sorted(names)
        assert len(folder) == count
        per_class = np.bincount(folder.targets, minlength=6)
        assert per_class.tolist() == [count // 6] * 6

        ann = json.loads((root / f'{split}_annotations.json').read_text())
        assert ann['classes'] == names
        assert len(ann['images']) == count
        for rec in ann['images']:
            i = rec['index']
            ref = render_sample(i, num_classes=6, img_size=(40, 48), seed=1, split=split)
            assert rec['file'] == f'{split}/{names[ref.label]}/{split}_{i:06d}.png'
            assert rec['label'] == ref.label and rec['class_name'] == names[ref.label]
            assert tuple(rec['box']) == ref.box
            assert (rec['height'], rec['width']) == (40, 48)
            pixels = np.asarray(Image.open(root / rec['file']).convert('RGB'))
            assert np.array_equal(pixels, ref.image)  # png is lossless

    marker = json.loads((root / 'vitzoo_shapes.json').read_text())
    assert marker['num_train'] == 24 and marker['num_classes'] == 6 and marker['img_size'] == [40, 48]
    # nothing left behind next to root
    assert sorted(p.name for p in tmp_path.iterdir()) == ['shapes']

    # second identical call: no-op (no file rewritten)
    files = sorted(p for p in root.rglob('*') if p.is_file())
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    time.sleep(0.01)
    with monkeypatch.context() as m:
        def no_render(*args, **kwargs):
            raise AssertionError('second write_image_folder call rendered images')
        m.setattr(shapes, 'render_sample', no_render)
        assert write_image_folder(root, **kw) == root
    assert sorted(p for p in root.rglob('*') if p.is_file()) == files
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes

    # different parameters: refuse unless overwrite=True
    with pytest.raises(FileExistsError, match='overwrite'):
        write_image_folder(root, **{**kw, 'seed': 2})
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    write_image_folder(root, **{**kw, 'seed': 2, 'num_val': 0}, overwrite=True)
    assert json.loads((root / 'vitzoo_shapes.json').read_text())['seed'] == 2
    assert not (root / 'val').exists() and not (root / 'val_annotations.json').exists()
    assert len(ImageFolder(str(root / 'train'))) == 24
    assert sorted(p.name for p in tmp_path.iterdir()) == ['shapes']


def test_write_image_folder_never_touches_foreign_dir(tmp_path):
    root = tmp_path / 'mine'
    root.mkdir()
    (root / 'precious.txt').write_text('keep me')
    with pytest.raises(FileExistsError, match='not a vitzoo shapes dataset'):
        write_image_folder(root, num_train=10, num_val=0, img_size=32, progress=False, overwrite=True)
    assert (root / 'precious.txt').read_text() == 'keep me'
    assert sorted(p.name for p in root.iterdir()) == ['precious.txt']
    # an existing empty directory is fine
    empty = tmp_path / 'empty'
    empty.mkdir()
    write_image_folder(empty, num_train=10, num_val=0, img_size=32, progress=False)
    assert len(list((empty / 'train').rglob('*.png'))) == 10


def test_cli(tmp_path, capsys):
    out = tmp_path / 'cli'
    root = shapes.main(['--output', str(out), '--num-train', '8', '--num-val', '4', '--num-classes', '4',
                        '--img-size', '32x40', '--seed', '3', '--no-progress'])
    assert root == out
    assert str(out) in capsys.readouterr().out
    assert json.loads((out / 'vitzoo_shapes.json').read_text())['img_size'] == [32, 40]
    assert len(list((out / 'val').rglob('*.png'))) == 4
    with Image.open(next((out / 'train').rglob('*.png'))) as im:
        assert im.size == (40, 32)

    with pytest.raises(SystemExit) as exc:
        shapes.main(['--help'])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    for opt in ('--output', '--num-train', '--num-val', '--num-classes', '--img-size', '--seed'):
        assert opt in help_text

    with pytest.raises(SystemExit) as exc:
        shapes.main(['--output', str(tmp_path / 'bad'), '--num-classes', '1000'])
    assert exc.value.code == 2
    assert 'num_classes must be in [1, 48]' in capsys.readouterr().err
    assert not (tmp_path / 'bad').exists()


# ---------------------------------------------------------------------------------------------------------------------
# bad arguments


@pytest.mark.parametrize('kwargs, pattern', [
    (dict(num_classes=MAX_CLASSES + 1), rf'num_classes must be in \[1, {MAX_CLASSES}\]'),
    (dict(num_classes=0), r'num_classes must be in \[1, '),
    (dict(img_size=16), r'img_size must be in \[32, '),
    (dict(img_size=(64, 31)), r'img_size must be in \[32, '),
    (dict(img_size=(64, 64, 3)), r'img_size must be an int or a \(height, width\) pair'),
    (dict(img_size=64.0), r'img_size must be an int'),
    (dict(seed=-1), r'seed must be >= 0'),
    (dict(split=''), r'split must be a non-empty string'),
    (dict(split='a/b'), r'split must be'),
])
def test_render_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        render_sample(0, **kwargs)


def test_bad_arguments_dataset_and_writer(tmp_path):
    with pytest.raises(ValueError, match=r'index must be >= 0'):
        render_sample(-1)
    with pytest.raises(ValueError, match=r'num_classes must be in \[1, 48\]'):
        class_names(49)
    with pytest.raises(ValueError, match=r'num_samples must be >= 0'):
        ShapesDataset(num_samples=-5)
    with pytest.raises(ValueError, match=r'num_classes must be in'):
        ShapesDataset(num_classes=100)
    with pytest.raises(ValueError, match=r'img_size must be in \[32, '):
        ShapesDataset(img_size=8)
    with pytest.raises(ValueError, match=r'num_train must be >= num_classes \(10\)'):
        write_image_folder(tmp_path / 'a', num_train=5, progress=False)
    with pytest.raises(ValueError, match=r'num_val must be 0 or >= num_classes \(10\)'):
        write_image_folder(tmp_path / 'a', num_train=10, num_val=3, progress=False)
    with pytest.raises(ValueError, match=r'image_format must be one of'):
        write_image_folder(tmp_path / 'a', num_train=10, num_val=0, image_format='tiff', progress=False)
    assert not (tmp_path / 'a').exists()
    assert list(Path(tmp_path).iterdir()) == []
