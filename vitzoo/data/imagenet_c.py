"""ImageNet-C data: the released folder tree, on-the-fly corruption of any ImageFolder, a writer of ImageNet-C trees.

Layout (hendrycks/robustness)::

    ROOT/<corruption>/<severity 1..5>/<wnid>/<file>.JPEG     every ROOT/<c>/<s> is an ImageFolder of 224x224 JPEGs

Creation protocol (``create_c/make_imagenet_c.py``), used here for on-the-fly corruption and by
:func:`write_imagenet_c`: ``Resize(R)`` (shorter side, bilinear) -> ``CenterCrop(C)`` -> corruption at severity ``s``
(``imagecorruptions.corrupt``) -> JPEG quality 85 -> decode. ImageNet uses ``R = 256, C = 224``; small demo images use
e.g. ``R = 73, C = 64`` (any ``C >= 32``, the minimum side imagecorruptions accepts). Corruptions draw from
``np.random``: every image is corrupted under its own seed derived from ``(seed, corruption, severity, index)`` (index
= position in the sorted ImageFolder sample list), with NumPy's global RNG state saved and restored around the call, so
the output does not depend on worker count, order or process.

imagecorruptions 1.1.2 fails on current scikit-image / NumPy 2 for glass_blur, gaussian_blur (``multichannel=``) and
fog (``np.float_``); :func:`load_imagecorruptions` installs a compatibility shim before first use. The shim
also makes impulse_noise deterministic: scikit-image's ``random_noise`` ignores ``np.random.seed`` (it draws from its
own ``default_rng``), so the shim passes it an ``rng`` drawn from ``np.random``.

Unreadable images are not fatal: the datasets return label ``-1`` (and a zero image) for them, which the evaluator
counts and reports as skipped. Structural problems (missing corruption / severity folder, empty folder, a class folder
set that differs between cells) raise :class:`ImageNetCError` naming the path.
"""
from __future__ import annotations

import io
import json
import os
import uuid
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.utils.data
from PIL import Image

from vitzoo.metrics import ALL_CORRUPTIONS, SEVERITIES

__all__ = [
    'ImageNetCError', 'IMG_EXTENSIONS', 'load_imagecorruptions', 'corruption_seed', 'corrupt_image',
    'imagenet_c_protocol', 'scan_image_folder', 'imagenet_c_cell', 'present_corruptions', 'ImageListDataset',
    'CorruptedImageDataset', 'write_imagenet_c', 'imagenet_subset_info',
]

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
JPEG_QUALITY = 85
MARKER_NAME = 'vitzoo_imagenet_c.json'
PathLike = Union[str, os.PathLike]


class ImageNetCError(ValueError):
    """Bad ImageNet-C input: a missing / empty folder, mismatching classes, bad corruption name or severity."""


_CORRUPT: Optional[Callable[..., np.ndarray]] = None


class _Proxy:
    def __init__(self, target: Any, **overrides: Any) -> None:
        self._target, self._overrides = target, overrides

    def __getattr__(self, name: str) -> Any:
        return self._overrides[name] if name in self._overrides else getattr(self._target, name)


class _SkimageProxy(_Proxy):
    """``skimage`` as seen by imagecorruptions, with ``util.random_noise`` drawing its seed from ``np.random``.

    scikit-image >= 0.19 ``random_noise`` uses its own ``np.random.default_rng()`` unless given ``rng``, so seeding
    ``np.random`` no longer makes impulse_noise deterministic; the wrapper passes ``rng`` drawn from ``np.random``.
    """

    def __init__(self, sk: Any) -> None:
        def random_noise(image: np.ndarray, *args: Any, **kw: Any) -> np.ndarray:
            if kw.get('rng') is None and kw.get('seed') is None:
                kw['rng'] = int(np.random.randint(0, 2 ** 31 - 1))
            return sk.util.random_noise(image, *args, **kw)
        super().__init__(sk, util=_Proxy(sk.util, random_noise=random_noise))


def load_imagecorruptions() -> Callable[..., np.ndarray]:
    """Return ``imagecorruptions.corrupt`` after installing the compatibility shim (idempotent).

    The shim translates ``skimage.filters.gaussian(multichannel=...)`` (removed from scikit-image) into ``channel_axis``
    and aliases ``np.float_`` (removed in NumPy 2) for fog's plasma fractal.
    """
    global _CORRUPT
    if _CORRUPT is not None:
        return _CORRUPT
    with warnings.catch_warnings():  # imagecorruptions imports the deprecated pkg_resources
        warnings.simplefilter('ignore')
        import imagecorruptions.corruptions as corruptions_mod
        from imagecorruptions import corrupt
    from skimage.filters import gaussian as sk_gaussian

    def gaussian_compat(image: np.ndarray, sigma: float = 1, multichannel: Optional[bool] = None, **kw: Any):
        if multichannel is not None and 'channel_axis' not in kw:
            kw['channel_axis'] = -1 if multichannel else None
        return sk_gaussian(image, sigma=sigma, **kw)

    if getattr(corruptions_mod.gaussian, '__name__', '') != 'gaussian_compat':
        corruptions_mod.gaussian = gaussian_compat  # glass_blur, gaussian_blur
    if 'float_' not in np.__dict__:  # fog -> plasma_fractal
        np.float_ = np.float64
    if not isinstance(corruptions_mod.sk, _SkimageProxy):  # impulse_noise: seed skimage's noise from np.random
        corruptions_mod.sk = _SkimageProxy(corruptions_mod.sk)
    _CORRUPT = corrupt
    return corrupt


def _check_corruption(corruption: str, severity: int) -> None:
    if corruption not in ALL_CORRUPTIONS:
        raise ImageNetCError(f'unknown corruption {corruption!r} (known: {", ".join(ALL_CORRUPTIONS)})')
    if int(severity) not in SEVERITIES:
        raise ImageNetCError(f'severity must be one of {list(SEVERITIES)}, got {severity!r}')


def corruption_seed(seed: int, corruption: str, severity: int, index: int) -> int:
    """32-bit NumPy seed of one corrupted image, a hash of ``(seed, corruption, severity, index)``."""
    return zlib.crc32(f'{int(seed)}/{corruption}/{int(severity)}/{int(index)}'.encode())


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int = 0, index: int = 0,
                  np_seed: Optional[int] = None) -> np.ndarray:
    """Corrupt a uint8 ``(H, W, 3)`` image (min side 32) deterministically; NumPy's global RNG state is preserved.

    ``np.random`` is seeded with :func:`corruption_seed` of ``(seed, corruption, severity, index)``, or with
    ``np_seed`` when given (a protocol with its own per-image seeds, e.g. Cityscapes-C's per-path hash).
    """
    _check_corruption(corruption, severity)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ImageNetCError(f'expected a uint8 (H, W, 3) image, got {image.dtype} {tuple(image.shape)}')
    if min(image.shape[:2]) < 32:
        raise ImageNetCError(f'imagecorruptions needs images with sides >= 32, got {tuple(image.shape[:2])}')
    corrupt = load_imagecorruptions()
    state = np.random.get_state()
    try:
        np.random.seed(corruption_seed(seed, corruption, severity, index) if np_seed is None else np_seed)
        out = corrupt(image, corruption_name=corruption, severity=int(severity))
    finally:
        np.random.set_state(state)
    return np.uint8(np.clip(out, 0, 255))


def _resize_center_crop(img: Image.Image, resize: int, crop: int) -> Image.Image:
    # torchvision Resize(int) semantics: shorter side -> resize, aspect kept; then the centre crop
    w, h = img.size
    if w <= h:
        nw, nh = resize, int(resize * h / w)
    else:
        nw, nh = int(resize * w / h), resize
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    if crop > min(nw, nh):
        raise ImageNetCError(f'crop {crop} is larger than the resized image {nw}x{nh} (resize {resize})')
    left, top = int(round((nw - crop) / 2.0)), int(round((nh - crop) / 2.0))
    return img.crop((left, top, left + crop, top + crop))


def imagenet_c_protocol(img: Image.Image, corruption: str, severity: int, *, seed: int = 0, index: int = 0,
                        resize: int = 256, crop: int = 224, jpeg_quality: int = JPEG_QUALITY) -> bytes:
    """Apply the ImageNet-C creation protocol to one image; returns the JPEG bytes (decode with ``Image.open``).

    Resize(resize) -> CenterCrop(crop) -> corrupt at ``severity`` (seeded by ``(seed, corruption, severity, index)``)
    -> JPEG at ``jpeg_quality`` (85 as in the released set).
    """
    arr = np.asarray(_resize_center_crop(img.convert('RGB'), resize, crop), dtype=np.uint8)
    out = corrupt_image(np.ascontiguousarray(arr), corruption, severity, seed=seed, index=index)
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format='JPEG', quality=int(jpeg_quality))
    return buf.getvalue()


def scan_image_folder(root: PathLike, what: str = 'image folder') -> Tuple[List[str], List[Tuple[str, int]]]:
    """Classes (sorted sub-folder names) and ``(path, label)`` samples of an ImageFolder; clear errors when empty.

    Raises:
        ImageNetCError: ``root`` is missing, has no class folders, or no images at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise ImageNetCError(f'{what} not found: {root}')
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
    if not classes:
        raise ImageNetCError(f'{what} {root} has no class folders (expected {root}/<class>/<image>)')
    samples = []
    for label, c in enumerate(classes):
        for dirpath, dirnames, files in os.walk(root / c, followlinks=True):
            dirnames.sort()
            for f in sorted(files):
                if f.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(dirpath, f), label))
    if not samples:
        raise ImageNetCError(f'{what} {root} contains no images ({len(classes)} empty class folders)')
    return classes, samples


def present_corruptions(root: PathLike) -> List[str]:
    """Known corruption folders under an ImageNet-C root, in canonical order."""
    root = Path(root)
    if not root.is_dir():
        raise ImageNetCError(f'ImageNet-C root not found: {root}')
    return [c for c in ALL_CORRUPTIONS if (root / c).is_dir()]


def imagenet_c_cell(root: PathLike, corruption: str, severity: int) -> Tuple[List[str], List[Tuple[str, int]]]:
    """Classes and samples of ``root/<corruption>/<severity>``, with errors naming what is missing or empty."""
    _check_corruption(corruption, severity)
    root = Path(root)
    if not (root / corruption).is_dir():
        raise ImageNetCError(f'missing corruption folder: {root / corruption} (present: '
                             f'{", ".join(present_corruptions(root)) or "none"}); pass --corruptions to evaluate a '
                             f'subset')
    cell = root / corruption / str(int(severity))
    if not cell.is_dir():
        raise ImageNetCError(f'missing severity folder: {cell}')
    return scan_image_folder(cell, what=f'{corruption} severity {severity} folder')


def _load_rgb(path: str) -> Optional[Image.Image]:
    try:
        with open(path, 'rb') as f:
            img = Image.open(f)
            img.load()
        return img.convert('RGB')
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


class ImageListDataset(torch.utils.data.Dataset):
    """``(path, label)`` samples -> ``(transform(image), label, index)``; an unreadable image gives label ``-1``.

    Args:
        samples: ``(path, label)`` pairs.
        transform: PIL image -> tensor of shape ``img_shape``.
        img_shape: Shape of the zero placeholder returned for unreadable images.
        label_map: Optional remapping of labels (e.g. folder index -> model class index).
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], transform: Callable[[Image.Image], torch.Tensor],
                 img_shape: Tuple[int, int, int], label_map: Optional[Sequence[int]] = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.img_shape = tuple(img_shape)
        self.label_map = list(label_map) if label_map is not None else None

    def __len__(self) -> int:
        return len(self.samples)

    def _label(self, label: int) -> int:
        return self.label_map[label] if self.label_map is not None else label

    def _image(self, index: int) -> Optional[Image.Image]:
        return _load_rgb(self.samples[index][0])

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int, int]:
        img = self._image(index)
        if img is None:
            return torch.zeros(self.img_shape), -1, index
        return self.transform(img), self._label(self.samples[index][1]), index


class CorruptedImageDataset(ImageListDataset):
    """On-the-fly ImageNet-C: each clean image goes through :func:`imagenet_c_protocol` before ``transform``.

    The JPEG encode/decode step is included, so the images equal those :func:`write_imagenet_c` writes.
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], transform: Callable[[Image.Image], torch.Tensor],
                 img_shape: Tuple[int, int, int], corruption: str, severity: int, seed: int = 0, resize: int = 256,
                 crop: int = 224, jpeg_quality: int = JPEG_QUALITY,
                 label_map: Optional[Sequence[int]] = None) -> None:
        super().__init__(samples, transform, img_shape, label_map)
        _check_corruption(corruption, severity)
        self.corruption, self.severity, self.seed = corruption, int(severity), int(seed)
        self.resize, self.crop, self.jpeg_quality = int(resize), int(crop), int(jpeg_quality)

    def _image(self, index: int) -> Optional[Image.Image]:
        img = _load_rgb(self.samples[index][0])
        if img is None:
            return None
        data = imagenet_c_protocol(img, self.corruption, self.severity, seed=self.seed, index=index,
                                   resize=self.resize, crop=self.crop, jpeg_quality=self.jpeg_quality)
        return Image.open(io.BytesIO(data)).convert('RGB')


def _write_one(job: Tuple[str, str, str, int, int, int, int, int, int]) -> int:
    src, dst, corruption, severity, index, seed, resize, crop, quality = job
    if os.path.exists(dst):
        return 0
    img = _load_rgb(src)
    if img is None:
        return -1
    data = imagenet_c_protocol(img, corruption, severity, seed=seed, index=index, resize=resize, crop=crop,
                               jpeg_quality=quality)
    tmp = f'{dst}.{uuid.uuid4().hex[:8]}.tmp'
    with open(tmp, 'wb') as f:
        f.write(data)
    os.replace(tmp, dst)  # atomic: an interrupted writer never leaves a truncated JPEG behind
    return 1


def write_imagenet_c(
        src: PathLike,
        dst: PathLike,
        corruptions: Sequence[str] = ALL_CORRUPTIONS,
        severities: Sequence[int] = SEVERITIES,
        *,
        seed: int = 0,
        resize: int = 256,
        crop: int = 224,
        jpeg_quality: int = JPEG_QUALITY,
        workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        progress: bool = False,
) -> Dict[str, Any]:
    """Write an ImageNet-C tree ``dst/<corruption>/<severity>/<class>/<stem>.JPEG`` from the ImageFolder ``src``.

    Resumable: existing files are kept (every file is written atomically). With ``world_size > 1`` each rank writes
    every ``world_size``-th image. Unreadable source images are skipped and counted. The parameters are recorded in
    ``dst/vitzoo_imagenet_c.json``; writing into a tree made with other parameters raises :class:`ImageNetCError`.

    Returns:
        ``{'written', 'existing', 'unreadable', 'images', 'params'}`` for this rank.
    """
    classes, samples = scan_image_folder(src, what='source image folder')
    for c in corruptions:
        for s in severities:
            _check_corruption(c, s)
    if crop < 32:
        raise ImageNetCError(f'crop {crop} is too small: imagecorruptions needs images with sides >= 32')
    if resize < crop:
        raise ImageNetCError(f'resize {resize} is smaller than the crop {crop}')
    dst = Path(dst)
    params = {'format': 'imagenet-c', 'source': str(Path(src).absolute()), 'seed': int(seed), 'resize': int(resize),
              'crop': int(crop), 'jpeg_quality': int(jpeg_quality), 'protocol': 'resize-centercrop-corrupt-jpeg'}
    marker = dst / MARKER_NAME
    if marker.is_file():
        old = json.loads(marker.read_text())
        diff = sorted(k for k in params if old.get(k) != params[k])
        if diff:
            raise ImageNetCError(f'{dst} holds an ImageNet-C tree made with other parameters ({", ".join(diff)}); '
                                 f'use another folder')
    dst.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        tmp = marker.with_suffix(f'.{uuid.uuid4().hex[:8]}.tmp')
        tmp.write_text(json.dumps(params, indent=1))
        os.replace(tmp, marker)
    jobs = []
    for c in corruptions:
        for s in severities:
            for cls in classes:
                (dst / c / str(int(s)) / cls).mkdir(parents=True, exist_ok=True)
            for i, (path, label) in enumerate(samples):
                if i % world_size != rank:
                    continue
                rel = Path(os.path.relpath(path, Path(src) / classes[label]))
                out = dst / c / str(int(s)) / classes[label] / rel.with_suffix('.JPEG')
                if rel.parent != Path('.'):
                    out.parent.mkdir(parents=True, exist_ok=True)
                jobs.append((path, str(out), c, int(s), i, int(seed), int(resize), int(crop), int(jpeg_quality)))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs), desc='write ImageNet-C', unit='img')
    counts = {1: 0, 0: 0, -1: 0}
    if workers > 0:
        import multiprocessing as mp
        with mp.get_context('spawn' if torch.cuda.is_initialized() else None).Pool(workers) as pool:
            for r in pool.imap_unordered(_write_one, jobs, chunksize=16):
                counts[r] += 1
                if bar is not None:
                    bar.update()
    else:
        for job in jobs:
            counts[_write_one(job)] += 1
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return {'written': counts[1], 'existing': counts[0], 'unreadable': counts[-1] // max(1, len(corruptions) *
            len(severities)), 'images': len(samples), 'params': params}


def imagenet_subset_info(subset: str) -> Tuple[List[str], List[int]]:
    """The 200 wnids of ImageNet-A / ImageNet-R and their indices in the 1000 ImageNet-1k classes (from timm's lists).

    Args:
        subset: ``'imagenet-a'`` or ``'imagenet-r'``.
    """
    from importlib import resources
    key = {'imagenet-a': 'imagenet_a', 'imagenet-r': 'imagenet_r'}.get(subset)
    if key is None:
        raise ImageNetCError(f'unknown subset {subset!r} (imagenet-a, imagenet-r)')
    info = resources.files('timm.data._info')
    wnids = info.joinpath(f'{key}_synsets.txt').read_text().split()
    indices = [int(x) for x in info.joinpath(f'{key}_indices.txt').read_text().split()]
    if len(wnids) != 200 or len(indices) != 200:
        raise ImageNetCError(f'timm ships {len(wnids)} {subset} wnids / {len(indices)} indices, expected 200')
    return wnids, indices
