"""Procedural "shapes x textures" demo dataset that needs no download.

Every sample is a single textured shape (circle, star, ring, ...) on a random smooth background. Samples are rendered on
the fly, deterministically from ``(seed, split, index)``, at any image size (square or not), and carry the class label,
the tight bounding box and the foreground mask, so the same data can drive classification, box/weak-localisation,
detection (COCO json) and segmentation tooling.

Class ``k`` is the pair ``(SHAPES[k % len(SHAPES)], TEXTURES[k // len(SHAPES)])``; the default 10 classes are the 10
most distinct shapes with a solid fill, and up to ``MAX_CLASSES`` (48) classes are supported.

Example::

    from vitzoo.data.shapes import ShapesDataset, render_sample, write_image_folder
    sample = render_sample(3, img_size=(96, 128))  # .image (96, 128, 3) uint8, .label 3, .box, .mask, .background
    ds = ShapesDataset(num_samples=500, img_size=64, transform=my_transform)  # (transform(PIL image), label)
    write_image_folder('/tmp/shapes', num_train=1000, num_val=200, img_size=96)  # torchvision ImageFolder tree

CLI::

    python -m vitzoo.data.shapes --output /tmp/shapes --num-train 1000 --num-val 200 --num-classes 10 --img-size 96
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch.utils.data
from PIL import Image

__all__ = [
    'SHAPES', 'TEXTURES', 'MAX_CLASSES', 'MIN_IMG_SIZE', 'MAX_IMG_SIZE', 'ShapeSample', 'class_names',
    'render_sample', 'ShapesDataset', 'write_image_folder', 'main',
]

# Ordered so that the first 10 shapes (the default 10 classes) are the most distinct under rotation and at low
# resolution; hexagon (close to a circle at 16 px) comes last.
SHAPES: tuple[str, ...] = (
    'circle', 'square', 'triangle', 'star', 'ring', 'cross', 'diamond', 'ellipse', 'crescent', 'arrow', 'heart',
    'hexagon',
)
TEXTURES: tuple[str, ...] = ('solid', 'stripes', 'checker', 'dots')
MAX_CLASSES: int = len(SHAPES) * len(TEXTURES)
MIN_IMG_SIZE: int = 32
MAX_IMG_SIZE: int = 4096
IMAGE_FORMATS: dict[str, str] = {'png': 'PNG', 'jpg': 'JPEG', 'jpeg': 'JPEG', 'bmp': 'BMP'}
MARKER_NAME = 'vitzoo_shapes.json'
RENDER_VERSION = 1  # bump when the rendering changes, so cached image folders are regenerated

# object diameter (of its circumscribed circle) as a fraction of the short image side; shapes fill ~90-96 % of it
_SCALE_RANGE = (0.28, 0.72)
_BACKGROUNDS = ('linear', 'radial', 'noise', 'stripes')
_MIN_CONTRAST = 100.0  # min RGB distance between object colours and the background colour segment


@dataclass
class ShapeSample:
    """One rendered sample.

    Attributes:
        image: (H, W, 3) uint8 RGB image.
        label: Class index in ``[0, num_classes)``.
        box: Tight box of ``mask`` as ``(x0, y0, x1, y1)`` in pixels, ``x1``/``y1`` exclusive.
        mask: (H, W) bool foreground mask; ``image == background`` exactly wherever ``mask`` is False.
        background: (H, W, 3) uint8 RGB background without the object.
    """
    image: np.ndarray
    label: int
    box: tuple[int, int, int, int]
    mask: np.ndarray
    background: np.ndarray


# ----------------------------------------------------------------------------------------------------------------------
# argument validation


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f'{name} must be an int, got {value!r} ({type(value).__name__})')
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        allowed = f'in [{lo}, {hi}]' if hi is not None else f'>= {lo}'
        raise ValueError(f'{name} must be {allowed}, got {value}')
    return value


def _check_num_classes(num_classes: Any) -> int:
    return _check_int('num_classes', num_classes, 1, MAX_CLASSES)


def _check_img_size(img_size: Any) -> tuple[int, int]:
    """Normalise ``img_size`` (int or (h, w)) to ``(h, w)``."""
    if isinstance(img_size, (int, np.integer)) and not isinstance(img_size, bool):
        h = w = int(img_size)
    elif isinstance(img_size, Sequence) and not isinstance(img_size, str) and len(img_size) == 2:
        h, w = (_check_int('img_size', v, MIN_IMG_SIZE, MAX_IMG_SIZE) for v in img_size)
    else:
        raise ValueError(f'img_size must be an int or a (height, width) pair, got {img_size!r}')
    for v in (h, w):
        if not MIN_IMG_SIZE <= v <= MAX_IMG_SIZE:
            raise ValueError(f'img_size must be in [{MIN_IMG_SIZE}, {MAX_IMG_SIZE}] (per side), got {img_size!r}')
    return h, w


def _check_seed(seed: Any) -> int:
    return _check_int('seed', seed, 0)


def _check_split(split: Any) -> str:
    if not isinstance(split, str) or not split or not all(c.isalnum() or c in '-_' for c in split):
        raise ValueError(f"split must be a non-empty string of letters, digits, '-' or '_' (e.g. 'train', 'val'), "
                         f'got {split!r}')
    return split


def _split_id(split: str) -> int:
    # crc32 is stable across processes and Python versions (unlike hash())
    return zlib.crc32(split.encode('utf-8'))


def class_names(num_classes: int = 10) -> list[str]:
    """Names of the first ``num_classes`` classes, e.g. ``['circle_solid', 'square_solid', ...]``.

    Args:
        num_classes: Number of classes, in ``[1, MAX_CLASSES]``.

    Returns:
        Filesystem-safe ``<shape>_<texture>`` names; ``class_names(k)`` is a prefix of ``class_names(k + 1)``.
    """
    num_classes = _check_num_classes(num_classes)
    n = len(SHAPES)
    return [f'{SHAPES[k % n]}_{TEXTURES[k // n]}' for k in range(num_classes)]


# ----------------------------------------------------------------------------------------------------------------------
# shapes: membership tests in the object's local frame (u right, v down), the shape fits in the unit disc


def _regular_polygon(u: np.ndarray, v: np.ndarray, n: int, circumradius: float, phase: float = 0.0) -> np.ndarray:
    apothem = circumradius * np.cos(np.pi / n)
    inside = np.ones(u.shape, dtype=bool)
    for k in range(n):
        a = phase + (2 * k + 1) * np.pi / n  # edge normals lie between the vertices at phase + 2*pi*k/n
        inside &= u * np.cos(a) + v * np.sin(a) <= apothem
    return inside


def _star(u: np.ndarray, v: np.ndarray, points: int = 5, outer: float = 0.95, inner: float = 0.45) -> np.ndarray:
    rho = np.hypot(u, v)
    sector = 2 * np.pi / points
    phi = np.mod(np.arctan2(v, u) + np.pi / 2, sector)  # straight up (v < 0) -> phi = 0: a star tip points up
    phi = np.minimum(phi, sector - phi)  # fold onto [0, sector / 2] by symmetry
    px, py = rho * np.cos(phi), rho * np.sin(phi)
    ax, ay = outer, 0.0
    bx, by = inner * np.cos(sector / 2), inner * np.sin(sector / 2)
    # origin side of the edge A-B: cross((B - A), (O - A)) > 0 for this geometry
    cross = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
    return cross >= 0


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if shape == 'circle':
        return u * u + v * v <= 0.9 ** 2
    if shape == 'square':
        return (np.abs(u) <= 0.67) & (np.abs(v) <= 0.67)
    if shape == 'triangle':
        return _regular_polygon(u, v, 3, 0.95, phase=-np.pi / 2)  # apex up
    if shape == 'star':
        return _star(u, v)
    if shape == 'ring':
        r2 = u * u + v * v
        return (r2 <= 0.92 ** 2) & (r2 >= 0.55 ** 2)
    if shape == 'cross':
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.28) & (av <= 0.92)) | ((av <= 0.28) & (au <= 0.92))
    if shape == 'diamond':  # elongated rhombus, so it is not a rotated square
        return np.abs(u) / 0.95 + np.abs(v) / 0.55 <= 1.0
    if shape == 'ellipse':
        return (u / 0.95) ** 2 + (v / 0.5) ** 2 <= 1.0
    if shape == 'crescent':
        return (u * u + v * v <= 0.9 ** 2) & ((u - 0.38) ** 2 + v * v >= 0.72 ** 2)
    if shape == 'arrow':
        shaft = (u >= -0.92) & (u <= 0.1) & (np.abs(v) <= 0.22)
        head = (u >= 0.05) & (np.abs(v) <= 0.62 * (0.92 - u) / 0.87)
        return shaft | head
    if shape == 'heart':  # (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, scaled/shifted so it fits the unit disc
        x, y = 1.4 * u, 0.118 - 1.4 * v
        return (x * x + y * y - 1.0) ** 3 - x * x * y ** 3 <= 0
    if shape == 'hexagon':
        return _regular_polygon(u, v, 6, 0.93)
    raise ValueError(f'unknown shape {shape!r}; expected one of {SHAPES}')


def _texture_mask(texture: str, u: np.ndarray, v: np.ndarray, freq: float, phase: tuple[float, float]) -> np.ndarray:
    """Pixels drawn in the second object colour (all False for 'solid')."""
    if texture == 'solid':
        return np.zeros(u.shape, dtype=bool)
    su, sv = u * freq + phase[0], v * freq + phase[1]
    if texture == 'stripes':
        return np.floor(su).astype(np.int64) % 2 == 1
    if texture == 'checker':
        return (np.floor(su).astype(np.int64) + np.floor(sv).astype(np.int64)) % 2 == 1
    if texture == 'dots':
        du, dv = su - np.floor(su) - 0.5, sv - np.floor(sv) - 0.5
        return du * du + dv * dv <= 0.33 ** 2
    raise ValueError(f'unknown texture {texture!r}; expected one of {TEXTURES}')


# texture frequency (cells per unit radius) ranges, tuned to stay visible for small objects
_TEXTURE_FREQ = {'solid': (1.0, 1.0), 'stripes': (2.0, 3.0), 'checker': (1.8, 2.6), 'dots': (1.8, 2.4)}


# ----------------------------------------------------------------------------------------------------------------------
# colours and backgrounds


def _dist_to_segment(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance of colours ``c`` (..., 3) to the RGB segment a-b."""
    ab = b - a
    t = np.clip(((c - a) @ ab) / max(float(ab @ ab), 1e-9), 0.0, 1.0)
    return np.linalg.norm(c - (a + t[..., None] * ab), axis=-1)


def _pick_object_colors(rng: np.random.Generator, c0: np.ndarray, c1: np.ndarray,
                        two_colors: bool) -> tuple[np.ndarray, np.ndarray]:
    """Random object colour(s) well separated from every background colour (and from each other)."""
    cand = rng.integers(0, 256, size=(64, 2, 3)).astype(np.float64)
    score = _dist_to_segment(cand[:, 0], c0, c1)
    if two_colors:
        score = np.minimum(score, _dist_to_segment(cand[:, 1], c0, c1))
        score = np.minimum(score, np.linalg.norm(cand[:, 0] - cand[:, 1], axis=-1))
    ok = np.flatnonzero(score >= _MIN_CONTRAST)
    i = int(ok[0]) if ok.size else int(np.argmax(score))
    return cand[i, 0], cand[i, 1]


def _bilinear_grid(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    """Upsample a small (gh, gw) grid to (h, w) with bilinear interpolation (align-corners style, elementwise)."""
    gh, gw = grid.shape

    def axis(n: int, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(n, dtype=np.float32) + 0.5) / n * (g - 1)
        i0 = np.minimum(pos.astype(np.int64), g - 2)
        return i0, i0 + 1, (pos - i0).astype(np.float32)

    y0, y1, wy = axis(h, gh)
    x0, x1, wx = axis(w, gw)
    wy, wx = wy[:, None], wx[None, :]
    top = grid[y0][:, x0] * (1 - wx) + grid[y0][:, x1] * wx
    bot = grid[y1][:, x0] * (1 - wx) + grid[y1][:, x1] * wx
    return top * (1 - wy) + bot * wy


def _background_field(kind: str, p: dict[str, Any], h: int, w: int) -> np.ndarray:
    """A smooth (h, w) float32 field in [0, 1] that blends the two background colours."""
    ys = ((np.arange(h, dtype=np.float32) + 0.5) / h)[:, None]
    xs = ((np.arange(w, dtype=np.float32) + 0.5) / w)[None, :]
    if kind == 'linear':
        ca, sa = np.float32(np.cos(p['angle'])), np.float32(np.sin(p['angle']))
        lo, hi = min(0.0, ca) + min(0.0, sa), max(0.0, ca) + max(0.0, sa)
        return (xs * ca + ys * sa - np.float32(lo)) / np.float32(hi - lo)
    if kind == 'radial':
        cx, cy = p['center']
        far = max(np.hypot(ex - cx, ey - cy) for ex in (0.0, 1.0) for ey in (0.0, 1.0))
        return np.sqrt((xs - np.float32(cx)) ** 2 + (ys - np.float32(cy)) ** 2) / np.float32(far)
    if kind == 'noise':
        return _bilinear_grid(p['grid'].astype(np.float32), h, w)
    if kind == 'stripes':
        ca, sa = np.float32(np.cos(p['angle'])), np.float32(np.sin(p['angle']))
        arg = (xs * ca + ys * sa) * np.float32(2 * np.pi * p['count']) + np.float32(p['phase'])
        return np.float32(0.5) + np.float32(0.5) * np.sin(arg)
    raise ValueError(f'unknown background {kind!r}')


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# rendering


def render_sample(
        index: int,
        *,
        num_classes: int = 10,
        img_size: int | tuple[int, int] = 224,
        seed: int = 0,
        split: str = 'train',
) -> ShapeSample:
    """Render sample ``index`` of ``split`` (pure function of its arguments).

    The label is ``index % num_classes``. All random choices come from ``np.random.default_rng([seed, crc32(split),
    index])`` and are made in image-relative units, so the same sample rendered at another size shows the same scene.

    Args:
        index: Sample index, ``>= 0``.
        num_classes: Number of classes, in ``[1, MAX_CLASSES]``.
        img_size: ``S`` for S x S or ``(height, width)``; each side in ``[MIN_IMG_SIZE, MAX_IMG_SIZE]``.
        seed: Dataset seed, ``>= 0``.
        split: Split name (e.g. ``'train'``, ``'val'``); different splits give different images.

    Returns:
        The rendered :class:`ShapeSample`.

    Raises:
        ValueError: On an out-of-range or ill-typed argument.
    """
    index = _check_int('index', index, 0)
    num_classes = _check_num_classes(num_classes)
    h, w = _check_img_size(img_size)
    seed = _check_seed(seed)
    split = _check_split(split)

    label = index % num_classes
    shape = SHAPES[label % len(SHAPES)]
    texture = TEXTURES[label // len(SHAPES)]
    rng = np.random.default_rng([seed, _split_id(split), index])

    # --- all scene parameters first (size independent) ----------------------------------------------------------------
    bg_kind = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]
    bg_params = {
        'angle': float(rng.uniform(0, 2 * np.pi)),
        'center': (float(rng.uniform(0, 1)), float(rng.uniform(0, 1))),
        'grid': rng.uniform(0, 1, size=(int(rng.integers(2, 6)), int(rng.integers(2, 6)))),
        'count': float(rng.uniform(2.0, 7.0)),
        'phase': float(rng.uniform(0, 2 * np.pi)),
    }
    c0 = rng.integers(0, 256, size=3).astype(np.float64)
    c1 = np.clip(c0 + rng.uniform(-100, 100, size=3), 0, 255)
    noise_sigma = float(rng.uniform(0.0, 6.0))
    col_a, col_b = _pick_object_colors(rng, c0, c1, two_colors=texture != 'solid')
    scale = float(rng.uniform(*_SCALE_RANGE))
    fx, fy = float(rng.uniform(0, 1)), float(rng.uniform(0, 1))
    theta = float(rng.uniform(0, 2 * np.pi))
    freq = float(rng.uniform(*_TEXTURE_FREQ[texture]))
    tex_phase = (float(rng.uniform(0, 2)), float(rng.uniform(0, 2)))

    # --- background ---------------------------------------------------------------------------------------------------
    t = _background_field(bg_kind, bg_params, h, w)
    c0f, dc = c0.astype(np.float32), (c1 - c0).astype(np.float32)
    bg = c0f + t[..., None] * dc
    if noise_sigma > 0:
        bg += rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(noise_sigma)
    background = _to_uint8(bg)

    # --- object: circumscribed circle of radius r fully inside the image ---------------------------------------------
    r = 0.5 * scale * min(h, w)
    cx = r + fx * (w - 2 * r)
    cy = r + fy * (h - 2 * r)
    x0, x1 = max(int(np.floor(cx - r)), 0), min(int(np.ceil(cx + r)) + 1, w)
    y0, y1 = max(int(np.floor(cy - r)), 0), min(int(np.ceil(cy + r)) + 1, h)
    dx = (np.arange(x0, x1, dtype=np.float64) + 0.5 - cx)[None, :]
    dy = (np.arange(y0, y1, dtype=np.float64) + 0.5 - cy)[:, None]
    ct, st = np.cos(theta), np.sin(theta)
    u = (dx * ct + dy * st) / r
    v = (dy * ct - dx * st) / r
    local = _shape_mask(shape, u, v)
    second = _texture_mask(texture, u, v, freq, tex_phase) & local

    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = local
    image = background.copy()
    region = image[y0:y1, x0:x1]
    region[local] = _to_uint8(col_a)
    region[second] = _to_uint8(col_b)

    rows, cols = np.flatnonzero(local.any(axis=1)), np.flatnonzero(local.any(axis=0))
    if rows.size == 0:  # cannot happen for the supported sizes (object diameter >= 8 px); guard anyway
        raise RuntimeError(f'empty object mask for index={index}, img_size={(h, w)}, seed={seed}, split={split!r}')
    box = (x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1)
    return ShapeSample(image=image, label=label, box=box, mask=mask, background=background)


# ----------------------------------------------------------------------------------------------------------------------
# torch dataset


class ShapesDataset(torch.utils.data.Dataset):
    """Map-style dataset of procedurally rendered shapes (rendered on the fly, deterministic per index).

    ``__getitem__`` returns ``(image, label)`` where ``image`` is an RGB ``PIL.Image`` passed through ``transform``, or
    ``(image, label, {'box': (x0, y0, x1, y1), 'mask': (H, W) bool ndarray})`` with ``return_meta=True``. Box and mask
    are in the coordinates of the untransformed ``img_size`` image.

    Attributes:
        classes: Class names, see :func:`class_names`.
        targets: Label of every sample (``index % num_classes``, hence balanced).
    """

    def __init__(
            self,
            num_samples: int = 1000,
            num_classes: int = 10,
            img_size: int | tuple[int, int] = 224,
            seed: int = 0,
            split: str = 'train',
            transform: Callable[[Image.Image], Any] | None = None,
            return_meta: bool = False,
    ) -> None:
        """Create the dataset.

        Args:
            num_samples: Number of samples, ``>= 0``.
            num_classes: Number of classes, in ``[1, MAX_CLASSES]``.
            img_size: ``S`` or ``(height, width)``, each side in ``[MIN_IMG_SIZE, MAX_IMG_SIZE]``.
            seed: Dataset seed, ``>= 0``.
            split: Split name; different splits give different images.
            transform: Optional callable applied to the PIL image (e.g. a torchvision transform).
            return_meta: Also return a dict with the box and mask.
        """
        self.num_samples = _check_int('num_samples', num_samples, 0)
        self.num_classes = _check_num_classes(num_classes)
        self.img_size = _check_img_size(img_size)
        self.seed = _check_seed(seed)
        self.split = _check_split(split)
        self.transform = transform
        self.return_meta = bool(return_meta)
        self.classes = class_names(self.num_classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = [i % self.num_classes for i in range(self.num_samples)]

    def __len__(self) -> int:
        return self.num_samples

    def render(self, index: int) -> ShapeSample:
        """Render sample ``index`` as a :class:`ShapeSample` (no transform)."""
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f'index {index} out of range for ShapesDataset of length {self.num_samples}')
        return render_sample(index % self.num_samples, num_classes=self.num_classes, img_size=self.img_size,
                             seed=self.seed, split=self.split)

    def __getitem__(self, index: int) -> tuple[Any, int] | tuple[Any, int, dict[str, Any]]:
        sample = self.render(int(index))
        img: Any = Image.fromarray(sample.image)
        if self.transform is not None:
            img = self.transform(img)
        if self.return_meta:
            return img, sample.label, {'box': sample.box, 'mask': sample.mask}
        return img, sample.label

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(num_samples={self.num_samples}, num_classes={self.num_classes}, '
                f'img_size={self.img_size}, seed={self.seed}, split={self.split!r})')


# ----------------------------------------------------------------------------------------------------------------------
# ImageFolder export


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if enabled:
        try:
            from tqdm.auto import tqdm
            return tqdm(total=total, desc=desc, unit='img')
        except ImportError:  # tqdm is a hard dependency of vitzoo, but keep the writer usable without it
            pass

    class _NoBar:
        def update(self, n: int = 1) -> None:
            pass

        def close(self) -> None:
            pass

    return _NoBar()


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def write_image_folder(
        root: str | os.PathLike[str],
        *,
        num_train: int = 1000,
        num_val: int = 200,
        num_classes: int = 10,
        img_size: int | tuple[int, int] = 224,
        seed: int = 0,
        image_format: str = 'png',
        progress: bool = True,
        overwrite: bool = False,
) -> Path:
    """Write the dataset as a torchvision ``ImageFolder`` tree (idempotent, atomic).

    Layout::

        root/train/<class>/train_000000.png ...   root/val/<class>/val_000000.png ...
        root/train_annotations.json                root/val_annotations.json
        root/vitzoo_shapes.json                    (parameters; written last, marks a complete dataset)

    Each annotation file is ``{"split", "classes", "images": [{"file", "index", "label", "class_name",
    "box": [x0, y0, x1, y1], "height", "width"}, ...]}`` with ``file`` relative to ``root`` and x1/y1 exclusive.
    Sample ``i`` of split ``s`` is ``render_sample(i, split=s, ...)``.

    The tree is written to a temporary sibling directory and renamed onto ``root`` at the end, so ``root`` is either
    absent or complete. If ``root`` already holds a complete dataset with the same parameters, nothing is written.

    Args:
        root: Output directory (created; its parent must be writable).
        num_train: Number of training images, ``>= num_classes`` (every class folder must be non-empty).
        num_val: Number of validation images, ``0`` (no val split) or ``>= num_classes``.
        num_classes: Number of classes, in ``[1, MAX_CLASSES]``.
        img_size: ``S`` or ``(height, width)``, each side in ``[MIN_IMG_SIZE, MAX_IMG_SIZE]``.
        seed: Dataset seed, ``>= 0``.
        image_format: One of ``'png'``, ``'jpg'``, ``'jpeg'``, ``'bmp'`` (png is lossless; box/mask match pixels).
        progress: Show a tqdm progress bar.
        overwrite: Replace an existing vitzoo shapes dataset with different parameters at ``root`` (a directory that
            is not a vitzoo shapes dataset is never deleted).

    Returns:
        ``Path(root)``.

    Raises:
        ValueError: On bad arguments.
        FileExistsError: If ``root`` exists and is not an identical dataset (and ``overwrite`` does not apply).
    """
    num_classes = _check_num_classes(num_classes)
    num_train = _check_int('num_train', num_train, 0)
    if num_train < num_classes:
        raise ValueError(f'num_train must be >= num_classes ({num_classes}) so every class folder is non-empty, '
                         f'got {num_train}')
    num_val = _check_int('num_val', num_val, 0)
    if 0 < num_val < num_classes:
        raise ValueError(f'num_val must be 0 or >= num_classes ({num_classes}) so every class folder is non-empty, '
                         f'got {num_val}')
    h, w = _check_img_size(img_size)
    seed = _check_seed(seed)
    fmt = str(image_format).lower().lstrip('.')
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f'image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}')

    root = Path(root).expanduser().absolute()
    params = {
        'dataset': 'vitzoo.data.shapes', 'render_version': RENDER_VERSION, 'num_train': num_train,
        'num_val': num_val, 'num_classes': num_classes, 'img_size': [h, w], 'seed': seed, 'image_format': fmt,
    }

    def existing_state() -> str:
        if not root.exists():
            return 'absent'
        if root.is_dir() and not any(root.iterdir()):
            return 'empty'
        marker = _read_marker(root)
        if marker == params:
            return 'same'
        return 'other_vitzoo' if marker is not None and marker.get('dataset') == params['dataset'] else 'foreign'

    state = existing_state()
    if state == 'same':
        return root
    if state == 'foreign':
        raise FileExistsError(f'{root} exists and is not a vitzoo shapes dataset; choose another output directory')
    if state == 'other_vitzoo' and not overwrite:
        raise FileExistsError(f'{root} holds a vitzoo shapes dataset with different parameters '
                              f'({_read_marker(root)}); pass overwrite=True (CLI: --overwrite) or another directory')

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f'.{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'
    tmp.mkdir()
    try:
        names = class_names(num_classes)
        bar = _progress(num_train + num_val, progress, f'shapes -> {root.name}')
        try:
            for split, count in (('train', num_train), ('val', num_val)):
                if count == 0:
                    continue
                for name in names:
                    (tmp / split / name).mkdir(parents=True)
                records = []
                for i in range(count):
                    s = render_sample(i, num_classes=num_classes, img_size=(h, w), seed=seed, split=split)
                    rel = f'{split}/{names[s.label]}/{split}_{i:06d}.{fmt}'
                    save_kw: dict[str, Any] = {'compress_level': 1} if fmt == 'png' else {}
                    if IMAGE_FORMATS[fmt] == 'JPEG':
                        save_kw = {'quality': 95}
                    Image.fromarray(s.image).save(tmp / rel, format=IMAGE_FORMATS[fmt], **save_kw)
                    records.append({'file': rel, 'index': i, 'label': s.label, 'class_name': names[s.label],
                                    'box': list(s.box), 'height': h, 'width': w})
                    bar.update(1)
                (tmp / f'{split}_annotations.json').write_text(
                    json.dumps({'split': split, 'classes': names, 'images': records}, indent=1))
        finally:
            bar.close()
        (tmp / MARKER_NAME).write_text(json.dumps(params, indent=1))  # last: marks the tree complete

        if existing_state() == 'other_vitzoo':  # overwrite=True: move the old dataset aside, delete after the swap
            old = root.parent / f'.{root.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}'
            os.replace(root, old)
            shutil.rmtree(old, ignore_errors=True)
        elif existing_state() == 'empty':
            root.rmdir()
        try:
            os.rename(tmp, root)
        except OSError:
            # another process finished first: accept its result if it is the same dataset
            if existing_state() != 'same':
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def _parse_img_size(text: str) -> int | tuple[int, int]:
    parts = text.lower().replace('x', ',').split(',')
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected S or HxW (e.g. 96 or 96x128), got {text!r}') from None
    if len(vals) == 1:
        return vals[0]
    if len(vals) == 2:
        return vals[0], vals[1]
    raise argparse.ArgumentTypeError(f'expected S or HxW (e.g. 96 or 96x128), got {text!r}')


def main(argv: Sequence[str] | None = None) -> Path:
    """CLI entry point: write the shapes dataset as an ImageFolder tree and print its path."""
    parser = argparse.ArgumentParser(
        prog='python -m vitzoo.data.shapes',
        description='Write the procedural vitzoo "shapes x textures" demo dataset as a torchvision ImageFolder tree '
                    '(DIR/train/<class>/*.png, DIR/val/<class>/*.png) plus DIR/<split>_annotations.json with the '
                    'per-image label and bounding box. Needs no download. Deterministic in --seed; re-running with the '
                    'same arguments is a no-op.',
        epilog='example: python -m vitzoo.data.shapes --output data/shapes96 --num-train 5000 --num-val 1000 '
               '--num-classes 10 --img-size 96   (then: torchvision.datasets.ImageFolder("data/shapes96/train"))',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument('--output', '-o', required=True, metavar='DIR', help='output directory (created atomically)')
    parser.add_argument('--num-train', type=int, default=1000, metavar='N',
                        help='number of training images (>= --num-classes)')
    parser.add_argument('--num-val', type=int, default=200, metavar='N',
                        help='number of validation images (0 = no val split, else >= --num-classes)')
    parser.add_argument('--num-classes', type=int, default=10, metavar='K',
                        help=f'number of classes, 1..{MAX_CLASSES} ({len(SHAPES)} shapes x {len(TEXTURES)} textures)')
    parser.add_argument('--img-size', type=_parse_img_size, default=224, metavar='S',
                        help=f'image size, S or HxW, each side in {MIN_IMG_SIZE}..{MAX_IMG_SIZE}')
    parser.add_argument('--seed', type=int, default=0,
                        help='dataset seed (>= 0); different seeds give different images')
    parser.add_argument('--format', dest='image_format', default='png', choices=sorted(IMAGE_FORMATS),
                        help='image file format')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an existing shapes dataset with different parameters in DIR')
    parser.add_argument('--no-progress', action='store_true', help='disable the progress bar')
    args = parser.parse_args(argv)
    try:
        root = write_image_folder(args.output, num_train=args.num_train, num_val=args.num_val,
                                  num_classes=args.num_classes, img_size=args.img_size, seed=args.seed,
                                  image_format=args.image_format, progress=not args.no_progress,
                                  overwrite=args.overwrite)
    except (ValueError, FileExistsError) as e:
        parser.error(str(e))
    print(root)
    return root


if __name__ == '__main__':
    main()
