"""WSOL evaluation data: CUB-200-2011 and ImageNet box files, the eval dataset, and the shapes dataset in CUB layout.

File formats (as the SAT code reads them, https://github.com/wpy1999/SAT ``DataLoader/``):

CUB-200-2011 (any root folder)::

    ROOT/test/<class_dir>/<file>.jpg           images (labels = sorted class folders, torchvision ImageFolder order)
    ROOT/test_list.txt                         one line per image: "<class_dir>/<file>.jpg;<label>"
    ROOT/test_bounding_box.txt                 one line per image, in test_list order: "x0 y0 x1 y1 h w"
                                               (corner boxes, floats, image HEIGHT before WIDTH; several boxes
                                               "x0 y0 x1 y1 x0 y0 x1 y1 ... h w" are accepted)

ImageNet (ILSVRC) validation::

    ROOT/val/<wnid>/<file>.JPEG                images (labels = sorted wnid folders)
    val_gt.txt                                 "<wnid>\\\\<file>.JPEG <W> <H> ; x1 y1 x2 y2 [x1 y1 x2 y2 ...]"
                                               (WIDTH before HEIGHT; the path separator is a doubled backslash)

GT boxes are mapped into the eval crop as SAT does (``Resize((R, R))`` then ``CenterCrop(C)``, shift ``(R - C) // 2``):
``x0' = int(max(x0 / w * R - shift, 0))``, ``x1' = int(min(x1 / w * R - shift, C - 1))``, the same for y with h.

Malformed input raises :class:`WSOLDataError` naming the file and line (missing box / list file, a line that does not
parse, an image that is listed but absent, a class folder that does not exist).

:func:`write_shapes_cub` writes the embedded shapes dataset (:mod:`vitzoo.data.shapes`) in the CUB layout, so the CUB
evaluation runs without any download.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.utils.data
from PIL import Image

__all__ = [
    'WSOLDataError', 'BoxRecord', 'read_cub_boxes', 'read_imagenet_boxes', 'boxes_to_crop', 'WSOLDataset',
    'cub_dataset', 'imagenet_dataset', 'wsol_eval_transform', 'wsol_tencrop_transform', 'write_shapes_cub',
]

PathLike = Union[str, os.PathLike]
_MARKER = 'vitzoo_shapes_cub.json'


class WSOLDataError(ValueError):
    """A WSOL list / box file or image folder does not fit; the message names the file (and line)."""


@dataclass
class BoxRecord:
    """One evaluation image.

    Attributes:
        path: Image path relative to the split's image folder, '/'-separated (e.g. ``001.Albatross/x.jpg``).
        boxes: (k, 4) GT boxes ``[x0, y0, x1, y1]`` in original image pixels.
        width: Original image width (from the box file).
        height: Original image height.
        source: ``file:line`` the record comes from (for error messages).
        label: Label given by the list file (-1 if none); the dataset uses the class folder order.
    """
    path: str
    boxes: np.ndarray
    width: float
    height: float
    source: str
    label: int = -1
    extra: Dict[str, Any] = field(default_factory=dict)


def _read_lines(path: PathLike, what: str) -> List[Tuple[int, str]]:
    path = Path(path)
    if not path.is_file():
        raise WSOLDataError(f'{what} not found: {path}')
    with open(path, 'r', encoding='utf-8') as f:
        return [(i, line.strip()) for i, line in enumerate(f, 1) if line.strip()]


def _floats(text: str, where: str, what: str) -> np.ndarray:
    try:
        vals = np.array([float(t) for t in text.split()], dtype=np.float64)
    except ValueError:
        raise WSOLDataError(f'{where}: cannot parse {what} from {text!r}') from None
    if not np.isfinite(vals).all():
        raise WSOLDataError(f'{where}: non-finite number in {text!r}')
    return vals


def _check_boxes(boxes: np.ndarray, where: str, line: str) -> None:
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise WSOLDataError(f'{where}: box with x1 < x0 or y1 < y0 in {line!r} (expected corner boxes x0 y0 x1 y1)')


def read_cub_boxes(box_file: PathLike, list_file: PathLike) -> List[BoxRecord]:
    """Read a CUB-style list file and its box file (``x0 y0 x1 y1 [...] h w`` per line, in list order).

    Args:
        box_file: e.g. ``ROOT/test_bounding_box.txt``.
        list_file: e.g. ``ROOT/test_list.txt`` (``<class_dir>/<file>;<label>`` per line).

    Returns:
        One :class:`BoxRecord` per list line.

    Raises:
        WSOLDataError: naming the file and line.
    """
    entries = _read_lines(list_file, 'CUB image list file')
    lines = _read_lines(box_file, 'CUB box file')
    if len(entries) != len(lines):
        raise WSOLDataError(f'{list_file} lists {len(entries)} images but {box_file} has {len(lines)} box lines '
                            f'(one per image, in list order, expected)')
    records = []
    for (li, entry), (bi, line) in zip(entries, lines):
        where = f'{box_file}:{bi}'
        parts = entry.split(';')
        rel = parts[0].strip().replace('\\', '/')
        if not rel or len(parts) > 2:
            raise WSOLDataError(f'{list_file}:{li}: expected "<class_dir>/<file>;<label>", got {entry!r}')
        label = -1
        if len(parts) == 2 and parts[1].strip():
            try:
                label = int(parts[1])
            except ValueError:
                raise WSOLDataError(f'{list_file}:{li}: label is not an integer in {entry!r}') from None
        vals = _floats(line, where, '"x0 y0 x1 y1 h w"')
        if len(vals) < 6 or (len(vals) - 2) % 4:
            raise WSOLDataError(f'{where}: expected "x0 y0 x1 y1 h w" (4 numbers per box, then height and width), '
                                f'got {len(vals)} numbers in {line!r}')
        h, w = vals[-2], vals[-1]
        if h <= 0 or w <= 0:
            raise WSOLDataError(f'{where}: image height / width must be positive, got h={h:g} w={w:g} in {line!r}')
        boxes = vals[:-2].reshape(-1, 4)
        _check_boxes(boxes, where, line)
        records.append(BoxRecord(path=rel, boxes=boxes, width=w, height=h, source=where, label=label,
                                 extra={'list_source': f'{list_file}:{li}'}))
    return records


def read_imagenet_boxes(box_file: PathLike) -> List[BoxRecord]:
    """Read an ImageNet validation box file (``<wnid>\\\\<file> W H ; x1 y1 x2 y2 [...]`` per line).

    Raises:
        WSOLDataError: naming the file and line.
    """
    records = []
    for i, line in _read_lines(box_file, 'ImageNet box file'):
        where = f'{box_file}:{i}'
        fmt = '"<wnid>\\\\<file> <W> <H> ; x1 y1 x2 y2 [...]"'
        if line.count(';') != 1:
            raise WSOLDataError(f'{where}: expected {fmt}, got {line!r}')
        head, tail = line.split(';')
        head_parts = head.split()
        if len(head_parts) != 3:
            raise WSOLDataError(f'{where}: expected {fmt}, got {line!r}')
        rel = head_parts[0].replace('\\\\', '\\').replace('\\', '/')
        wh = _floats(' '.join(head_parts[1:]), where, 'the image width and height')
        vals = _floats(tail, where, 'boxes')
        if len(vals) == 0 or len(vals) % 4:
            raise WSOLDataError(f'{where}: expected 4 numbers per box after ";", got {len(vals)} in {line!r}')
        if (wh <= 0).any():
            raise WSOLDataError(f'{where}: image width / height must be positive in {line!r}')
        boxes = vals.reshape(-1, 4).astype(np.float32)  # the original parses ImageNet boxes as float32
        _check_boxes(boxes, where, line)
        records.append(BoxRecord(path=rel, boxes=boxes, width=float(np.float32(wh[0])),
                                 height=float(np.float32(wh[1])), source=where))
    return records


def boxes_to_crop(
        boxes: np.ndarray,
        width: float,
        height: float,
        resize_size: int = 256,
        crop_size: int = 224,
) -> np.ndarray:
    """Map original-pixel GT boxes into the ``Resize((R, R)) -> CenterCrop(C)`` eval crop, exactly as SAT.

    Returns:
        (k, 4) float64 boxes with integer values, clipped to ``[0, C - 1]``.
    """
    b = np.array(boxes, copy=True).reshape(-1, 4)
    if b.dtype not in (np.float32, np.float64):
        b = b.astype(np.float64)
    ft = b.dtype.type  # the ImageNet reader computes in float32, the CUB one in float64, as the original loaders
    shift = ft((resize_size - crop_size) // 2)
    # same operation order as the original ((x / w) * R - shift): int() truncation is sensitive to the last ulp
    b[:, 0::2] = b[:, 0::2] / ft(width) * ft(resize_size) - shift
    b[:, 1::2] = b[:, 1::2] / ft(height) * ft(resize_size) - shift
    b[:, :2] = np.maximum(b[:, :2], 0)
    b[:, 2:] = np.minimum(b[:, 2:], ft(crop_size - 1))
    return np.trunc(b).astype(np.float64)  # int() truncates toward zero, as the original


def wsol_eval_transform(
        resize_size: int = 256,
        crop_size: int = 224,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
) -> Callable:
    """SAT's eval transform: ``Resize((R, R))`` (aspect-distorting, bilinear) -> ``CenterCrop(C)`` -> normalise."""
    from torchvision import transforms
    return transforms.Compose([
        transforms.Resize((resize_size, resize_size)),
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        transforms.Normalize(mean=mean, std=std),
    ])


class _StackCrops:
    """PIL crops -> normalised (n, 3, H, W) tensor (a class, not a lambda: picklable for loader workers)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, crops: Sequence[Image.Image]) -> torch.Tensor:
        from torchvision.transforms import functional as TF
        return torch.stack([TF.normalize(TF.to_tensor(c), self.mean, self.std) for c in crops])


def wsol_tencrop_transform(
        resize_size: int = 256,
        crop_size: int = 224,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
) -> Callable:
    """SAT's ten-crop classification transform: ``Resize((R, R))`` -> ``TenCrop(C)`` -> (10, 3, C, C)."""
    from torchvision import transforms
    return transforms.Compose([
        transforms.Resize((resize_size, resize_size)), transforms.TenCrop(crop_size), _StackCrops(mean, std)])


class WSOLDataset(torch.utils.data.Dataset):
    """Images with labels and GT boxes mapped into the eval crop.

    ``__getitem__`` returns ``(image, label, index)``; the boxes of item ``i`` are ``self.gt_boxes[i]`` ((k, 4), crop
    pixels) because their number varies per image. Every listed image is checked to exist at construction.

    Args:
        image_root: Folder of the split (``ROOT/test`` for CUB, ``ROOT/val`` for ImageNet): ``<class>/<file>``.
        records: From :func:`read_cub_boxes` / :func:`read_imagenet_boxes`.
        transform: Image transform (default :func:`wsol_eval_transform`).
        resize_size: R of the eval resize (for the box mapping).
        crop_size: C of the eval crop.
        extra_transform: Optional second transform whose output is returned too (e.g. ten-crop classification).
    """

    def __init__(
            self,
            image_root: PathLike,
            records: Sequence[BoxRecord],
            transform: Optional[Callable] = None,
            resize_size: int = 256,
            crop_size: int = 224,
            extra_transform: Optional[Callable] = None,
    ):
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise WSOLDataError(f'image folder not found: {self.image_root}')
        self.classes = sorted(d.name for d in os.scandir(self.image_root) if d.is_dir())
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.records = list(records)
        self.transform = transform or wsol_eval_transform(resize_size, crop_size)
        self.extra_transform = extra_transform
        self.resize_size, self.crop_size = resize_size, crop_size
        self.labels: List[int] = []
        self.gt_boxes: List[np.ndarray] = []
        for r in self.records:
            where = r.extra.get('list_source', r.source)
            cls = r.path.split('/')[0] if '/' in r.path else ''
            if cls not in self.class_to_idx:
                raise WSOLDataError(f'{where}: class folder {cls!r} of {r.path!r} not found in {self.image_root}')
            if not (self.image_root / r.path).is_file():
                raise WSOLDataError(f'{where}: image {r.path!r} is listed but absent from {self.image_root}')
            self.labels.append(self.class_to_idx[cls])
            self.gt_boxes.append(boxes_to_crop(r.boxes, r.width, r.height, resize_size, crop_size))

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> Image.Image:
        """The original RGB image of item ``index``."""
        return Image.open(self.image_root / self.records[index].path).convert('RGB')

    def __getitem__(self, index: int) -> Tuple:
        img = self.load(index)
        out = (self.transform(img), self.labels[index], index)
        if self.extra_transform is not None:
            out = out + (self.extra_transform(img),)
        return out


def cub_dataset(
        root: PathLike,
        split: str = 'test',
        list_file: Optional[PathLike] = None,
        box_file: Optional[PathLike] = None,
        **kwargs,
) -> WSOLDataset:
    """CUB layout: images ``ROOT/<split>/``, list ``ROOT/<split>_list.txt``, boxes ``ROOT/<split>_bounding_box.txt``."""
    root = Path(root)
    list_file = Path(list_file) if list_file else root / f'{split}_list.txt'
    box_file = Path(box_file) if box_file else root / f'{split}_bounding_box.txt'
    return WSOLDataset(root / split, read_cub_boxes(box_file, list_file), **kwargs)


def imagenet_dataset(
        root: PathLike,
        split: str = 'val',
        box_file: Optional[PathLike] = None,
        **kwargs,
) -> WSOLDataset:
    """ImageNet layout: images ``ROOT/<split>/<wnid>/``, boxes ``box_file`` (default ``ROOT/val_gt.txt``)."""
    root = Path(root)
    box_file = Path(box_file) if box_file else root / 'val_gt.txt'
    return WSOLDataset(root / split, read_imagenet_boxes(box_file), **kwargs)


def write_shapes_cub(
        root: PathLike,
        num_train: int = 1000,
        num_test: int = 200,
        num_classes: int = 10,
        img_size: Union[int, Tuple[int, int]] = 96,
        seed: int = 0,
        progress: bool = False,
) -> Path:
    """Write the embedded shapes dataset in the CUB-200-2011 layout (idempotent, atomic).

    Layout: ``ROOT/{train,test}/<NNN.class_name>/<split>_<index>.png``, ``ROOT/{train,test}_list.txt``
    (``<class_dir>/<file>;<label>``) and ``ROOT/{train,test}_bounding_box.txt`` (``x0 y0 x1 y1 h w``, x1 / y1
    exclusive, the tight box of the shape). Class folders are numbered like CUB's, so the sorted-folder labels equal
    the shapes labels. Train and test images come from different render splits (held out).

    Returns:
        ``Path(root)``.
    """
    from vitzoo.data.shapes import RENDER_VERSION, class_names, render_sample
    root = Path(root).expanduser().absolute()
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    params = {'layout': 'cub', 'render_version': RENDER_VERSION, 'num_train': num_train, 'num_test': num_test,
              'num_classes': num_classes, 'img_size': [h, w], 'seed': seed}
    marker = root / _MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                return root
        except ValueError:
            pass
    if root.exists() and any(root.iterdir()) and not marker.is_file():
        raise FileExistsError(f'{root} exists and is not a vitzoo shapes-CUB dataset; choose another folder')
    names = [f'{k:03d}.{n}' for k, n in enumerate(class_names(num_classes))]
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f'.{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=num_train + num_test, desc=f'shapes-cub -> {root.name}', unit='img')
    try:
        for split, count in (('train', num_train), ('test', num_test)):
            for n in names:
                (tmp / split / n).mkdir(parents=True)
            lst, box = [], []
            for i in range(count):
                s = render_sample(i, num_classes=num_classes, img_size=(h, w), seed=seed, split=split)
                rel = f'{names[s.label]}/{split}_{i:06d}.png'
                Image.fromarray(s.image).save(tmp / split / rel, compress_level=1)
                lst.append(f'{rel};{s.label}\n')
                x0, y0, x1, y1 = s.box
                box.append(f'{x0:.1f} {y0:.1f} {x1:.1f} {y1:.1f} {h} {w}\n')
                if bar is not None:
                    bar.update(1)
            (tmp / f'{split}_list.txt').write_text(''.join(lst))
            (tmp / f'{split}_bounding_box.txt').write_text(''.join(box))
        (tmp / _MARKER).write_text(json.dumps(params, indent=1))
        if root.exists():
            shutil.rmtree(root)
        os.rename(tmp, root)
    finally:
        if bar is not None:
            bar.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
