"""The embedded shapes data as dense-task datasets: COCO instances, an ADE20K-style and a Cityscapes-style folder.

Every image is rendered by :func:`vitzoo.data.shapes.render_sample` (deterministic in ``seed``). Odd-indexed images get
a second object pasted over the first (the pasted object occludes it), so there are one or two instances per image.

- :func:`write_coco`: ``{root}/{train,val}/NNNNNN.png`` + ``{root}/annotations/instances_{train,val}.json`` with boxes
  (xywh), compressed-RLE masks, areas and ``iscrowd=0``; category ids 1..num_classes (mmdet ``CocoDataset``).
- :func:`write_ade20k`: ``{root}/images/{training,validation}/*.png`` + ``{root}/annotations/...`` label PNGs with
  0 = background and ``k + 1`` for class k (use ``reduce_zero_label=False`` and :func:`seg_classes`).
- :func:`write_cityscapes`: ``{root}/leftImg8bit/{train,val}/shapes/*_leftImg8bit.png`` +
  ``{root}/gtFine/.../*_gtFine_labelTrainIds.png`` with 19-class train ids (background = 0 'road', class k =
  ``11 + k % 8``), readable by mmseg's ``CityscapesDataset``.

CLI: ``python -m vitzoo.data.dense {coco,ade20k,cityscapes} ROOT [--train N] [--val N] [--img-size S]``.
"""
import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from vitzoo.data.shapes import class_names, render_sample

__all__ = ['render_scene', 'write_coco', 'write_ade20k', 'write_cityscapes', 'seg_classes']


def render_scene(
        index: int, num_classes: int = 3, img_size: int = 128, seed: int = 0, split: str = 'train',
) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """One image and its instances ``[(label, mask), ...]`` (masks disjoint, non-empty, in paint order)."""
    s = render_sample(index, num_classes=num_classes, img_size=img_size, seed=seed, split=split)
    image = s.image.copy()
    instances = [(s.label, s.mask.copy())]
    if index % 2 == 1:
        # paste the object of another sample of the same split (it occludes the first)
        other = render_sample(index + 100003, num_classes=num_classes, img_size=img_size, seed=seed, split=split)
        image[other.mask] = other.image[other.mask]
        instances = [(lab, m & ~other.mask) for lab, m in instances] + [(other.label, other.mask.copy())]
    return image, [(lab, m) for lab, m in instances if m.sum() >= 4]


def _box(mask: np.ndarray) -> List[float]:
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def write_coco(
        root: str, num_train: int = 8, num_val: int = 4, img_size: int = 128, num_classes: int = 3, seed: int = 0,
) -> Dict[str, str]:
    """Write a COCO-format instance dataset; returns the annotation file per split."""
    from pycocotools import mask as mask_utils
    root_p = Path(root)
    cats = [dict(id=i + 1, name=n, supercategory='shape') for i, n in enumerate(class_names(num_classes))]
    out = {}
    for split, n in (('train', num_train), ('val', num_val)):
        (root_p / split).mkdir(parents=True, exist_ok=True)
        (root_p / 'annotations').mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(n):
            image, instances = render_scene(i, num_classes, img_size, seed, split)
            name = f'{i:06d}.png'
            Image.fromarray(image).save(root_p / split / name)
            h, w = image.shape[:2]
            images.append(dict(id=i + 1, file_name=name, height=h, width=w))
            for label, m in instances:
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                rle['counts'] = rle['counts'].decode('ascii')
                anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=int(label) + 1, bbox=_box(m),
                                 area=float(m.sum()), segmentation=rle, iscrowd=0))
        ann_file = root_p / 'annotations' / f'instances_{split}.json'
        ann_file.write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)))
        out[split] = str(ann_file)
    return out


def seg_classes(num_classes: int = 3) -> Tuple[str, ...]:
    """Class names of the ADE20K-style folder: 'background' then the shape classes."""
    return ('background',) + tuple(class_names(num_classes))


def _label_map(shape: Tuple[int, int], instances: Sequence[Tuple[int, np.ndarray]], bg: int, lut) -> np.ndarray:
    seg = np.full(shape, bg, np.uint8)
    for label, m in instances:
        seg[m] = lut(label)
    return seg


def write_ade20k(
        root: str, num_train: int = 8, num_val: int = 4, img_size: int = 128, num_classes: int = 3, seed: int = 0,
) -> str:
    """Write an ADE20K-style folder (0 = background, k + 1 = class k); returns ``root``."""
    root_p = Path(root)
    for split, folder, n in (('train', 'training', num_train), ('val', 'validation', num_val)):
        (root_p / 'images' / folder).mkdir(parents=True, exist_ok=True)
        (root_p / 'annotations' / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, instances = render_scene(i, num_classes, img_size, seed, split)
            name = f'shapes_{split}_{i:06d}'
            Image.fromarray(image).save(root_p / 'images' / folder / f'{name}.png')
            seg = _label_map(image.shape[:2], instances, 0, lambda k: k + 1)
            Image.fromarray(seg).save(root_p / 'annotations' / folder / f'{name}.png')
    return str(root_p)


def write_cityscapes(
        root: str, num_train: int = 4, num_val: int = 4, img_size: Tuple[int, int] = (128, 256),
        num_classes: int = 3, seed: int = 0,
) -> str:
    """Write a Cityscapes-format tree (``leftImg8bit`` / ``gtFine`` labelTrainIds); returns ``root``."""
    root_p = Path(root)
    for split, n in (('train', num_train), ('val', num_val)):
        img_dir = root_p / 'leftImg8bit' / split / 'shapes'
        gt_dir = root_p / 'gtFine' / split / 'shapes'
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, instances = render_scene(i, num_classes, img_size, seed, split)
            name = f'shapes_{i:06d}_000019'
            Image.fromarray(image).save(img_dir / f'{name}_leftImg8bit.png')
            seg = _label_map(image.shape[:2], instances, 0, lambda k: 11 + k % 8)
            Image.fromarray(seg).save(gt_dir / f'{name}_gtFine_labelTrainIds.png')
    return str(root_p)


def main(argv: Optional[Sequence[str]] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('format', choices=('coco', 'ade20k', 'cityscapes'))
    p.add_argument('root')
    p.add_argument('--train', type=int, default=8)
    p.add_argument('--val', type=int, default=4)
    p.add_argument('--img-size', type=int, default=128)
    p.add_argument('--num-classes', type=int, default=3)
    p.add_argument('--seed', type=int, default=0)
    a = p.parse_args(argv)
    kw = dict(num_train=a.train, num_val=a.val, num_classes=a.num_classes, seed=a.seed)
    if a.format == 'coco':
        write_coco(a.root, img_size=a.img_size, **kw)
    elif a.format == 'ade20k':
        write_ade20k(a.root, img_size=a.img_size, **kw)
    else:
        write_cityscapes(a.root, img_size=(a.img_size, 2 * a.img_size), **kw)
    print(a.root)
    return a.root


if __name__ == '__main__':
    main()
