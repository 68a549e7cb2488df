"""Weakly supervised object localization (WSOL): boxes from localization maps, IoU and the localization metrics.

Box extraction follows the SAT evaluator (``evaluator.py`` ``val_loc_one_epoch`` of https://github.com/wpy1999/SAT),
vectorised over the batch:

1. min-max normalise each map: ``(m - min) / (max - min + 1e-5)``;
2. bilinear upsampling to the eval crop (half-pixel centres, as ``cv2.resize``);
3. foreground = ``map > threshold``;
4. the largest 8-connected component (ties: the first in raster order);
5. its bounding box ``[x0, y0, x1, y1]`` with ``x1`` / ``y1`` exclusive (``regionprops`` bbox); with no foreground the
   box is the whole crop ``[0, 0, W, H]``.

IoU uses the inclusive "+1" pixel convention ``(x1 - x0 + 1) (y1 - y0 + 1)``, the maximum over an image's GT boxes.

Metrics (:class:`WSOLMeter`), in percent:
    - at each chosen map threshold: GT-known Loc (IoU >= 0.5), Top-1 Loc (top-1 correct and IoU >= 0.5), Top-5 Loc,
      and the IoU >= 0.3 / 0.5 / 0.7 accuracies (what the SAT code prints as "maxboxaccv2");
    - the real MaxBoxAccV2 of Choe et al. (CVPR 2020, https://github.com/clovaai/wsolevaluation ``BoxEvaluator`` with
      ``multi_contour_eval=True``): the map quantised to 8 bits is thresholded at every ``tau`` of
      ``arange(0, 1, cam_curve_interval)``; every contour's box (not just the largest) is matched against every GT box;
      BoxAcc(tau, delta) is the share of images with best IoU >= delta; MaxBoxAcc(delta) is its max over tau, and
      MaxBoxAccV2 the mean over delta in {0.3, 0.5, 0.7};
    - the trivial baseline: the same accuracies for the whole-crop box.

The SAT code selects its map threshold on the test set; here every requested threshold is reported and none is
selected on the evaluated data. scipy / opencv are imported lazily (opencv only for MaxBoxAccV2, with a scipy fallback
that ignores hole contours).
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    'normalize_maps', 'largest_component_boxes', 'boxes_from_maps', 'box_iou', 'max_iou', 'contour_boxes',
    'best_iou_per_threshold', 'WSOLMeter',
]

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]


def _to_numpy(x: ArrayLike, dtype: Any = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _size2(size: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def normalize_maps(maps: ArrayLike, size: Optional[Union[int, Tuple[int, int]]] = None) -> torch.Tensor:
    """Min-max normalise each map (``+1e-5`` in the denominator, as SAT) and upsample it bilinearly.

    Args:
        maps: (B, h, w) localization maps.
        size: Output (H, W) (an int for square); None keeps (h, w).

    Returns:
        (B, H, W) float32 tensor in [0, 1).
    """
    m = maps.detach() if isinstance(maps, torch.Tensor) else torch.as_tensor(np.asarray(maps))
    m = m.float().cpu()
    if m.dim() == 2:
        m = m[None]
    if m.dim() != 3:
        raise ValueError(f'expected (B, h, w) maps, got shape {tuple(m.shape)}')
    flat = m.flatten(1)
    lo = flat.min(dim=1).values[:, None, None]
    hi = flat.max(dim=1).values[:, None, None]
    m = (m - lo) / (hi - lo + 1e-5)
    if size is not None and tuple(m.shape[-2:]) != _size2(size):
        # align_corners=False == cv2.resize INTER_LINEAR (half-pixel centres, clamped borders) when upsampling
        m = F.interpolate(m[:, None], size=_size2(size), mode='bilinear', align_corners=False)[:, 0]
    return m


def _ndimage() -> Any:
    try:
        from scipy import ndimage
    except ImportError as e:  # pragma: no cover - scipy is part of the vitzoo[wsol] extra
        raise ImportError('vitzoo.wsol box extraction needs scipy: pip install "vitzoo[wsol]"') from e
    return ndimage


def _label_stack(binary: np.ndarray) -> Tuple[np.ndarray, int]:
    """8-connected components of each (H, W) slice of a (B, H, W) stack, labelled in one call (no cross-slice links)."""
    ndimage = _ndimage()
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # full 8-connectivity inside a slice, none across slices
    return ndimage.label(binary, structure=structure)


def largest_component_boxes(binary: ArrayLike) -> np.ndarray:
    """Box of the largest 8-connected foreground component of each mask.

    Args:
        binary: (B, H, W) boolean foreground masks.

    Returns:
        (B, 4) int64 boxes ``[x0, y0, x1, y1]`` (x1 / y1 exclusive); ``[0, 0, W, H]`` where a mask is empty.
    """
    ndimage = _ndimage()
    binary = _to_numpy(binary, dtype=bool)
    if binary.ndim != 3:
        raise ValueError(f'expected (B, H, W) masks, got shape {binary.shape}')
    B, H, W = binary.shape
    boxes = np.tile(np.array([0, 0, W, H], dtype=np.int64), (B, 1))
    labels, n = _label_stack(binary)
    if n == 0:
        return boxes
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    slices = ndimage.find_objects(labels)
    comp = np.array([[s[0].start, s[2].start, s[1].start, s[2].stop, s[1].stop] for s in slices], dtype=np.int64)
    # per image: the largest component, the first in raster order among ties (lexsort's last key is the primary one)
    order = np.lexsort((np.arange(n), -counts, comp[:, 0]))
    first = order[np.r_[True, comp[order[1:], 0] != comp[order[:-1], 0]]]
    boxes[comp[first, 0]] = comp[first, 1:]
    return boxes


def boxes_from_maps(
        maps: ArrayLike,
        threshold: float = 0.4,
        size: Optional[Union[int, Tuple[int, int]]] = None,
        normalized: bool = False,
) -> np.ndarray:
    """SAT's boxes: min-max normalise, upsample to ``size``, ``> threshold``, largest 8-connected component, bbox.

    Args:
        maps: (B, h, w) localization maps (or already normalised maps with ``normalized=True``).
        threshold: Foreground threshold on the normalised map (SAT: 0.4 on CUB, 0.3 on ImageNet).
        size: Eval crop size (H, W) (an int for square); None keeps the map size.
        normalized: ``maps`` already went through :func:`normalize_maps`.

    Returns:
        (B, 4) int64 boxes ``[x0, y0, x1, y1]``, x1 / y1 exclusive, in crop pixels.
    """
    m = torch.as_tensor(_to_numpy(maps, np.float32)) if normalized else normalize_maps(maps, size)
    return largest_component_boxes((m > threshold).numpy())


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of broadcast (..., 4) box arrays, "+1" convention, 0 where the union is not positive."""
    iw = np.maximum(0.0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    ih = np.maximum(0.0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def box_iou(boxes_a: ArrayLike, boxes_b: ArrayLike) -> np.ndarray:
    """Pairwise IoU with the inclusive "+1" pixel convention (SAT ``utils/accuracy.IoU``, wsolevaluation).

    Args:
        boxes_a: (N, 4) boxes ``[x0, y0, x1, y1]``.
        boxes_b: (M, 4) boxes.

    Returns:
        (N, M) float64 IoUs; 0 where the union is not positive (degenerate boxes).
    """
    a = _to_numpy(boxes_a, np.float64).reshape(-1, 4)
    b = _to_numpy(boxes_b, np.float64).reshape(-1, 4)
    return _iou(a[:, None], b[None])


def max_iou(boxes: ArrayLike, gt_boxes: Sequence[ArrayLike]) -> np.ndarray:
    """Per image, the best IoU of its predicted box against any of its GT boxes.

    Args:
        boxes: (B, 4) predicted boxes.
        gt_boxes: B arrays of shape (k_i, 4), k_i >= 1.

    Returns:
        (B,) float64 IoUs.
    """
    boxes = _to_numpy(boxes, np.float64).reshape(-1, 4)
    if len(gt_boxes) != len(boxes):
        raise ValueError(f'{len(boxes)} boxes but {len(gt_boxes)} GT box lists')
    counts = [len(_to_numpy(g).reshape(-1, 4)) for g in gt_boxes]
    if min(counts, default=1) < 1:
        raise ValueError('every image needs at least one GT box')
    gt = np.concatenate([_to_numpy(g, np.float64).reshape(-1, 4) for g in gt_boxes]) if counts else np.zeros((0, 4))
    owner = np.repeat(np.arange(len(boxes)), counts)
    ious = _iou(boxes[owner], gt)
    out = np.full(len(boxes), -np.inf)
    np.maximum.at(out, owner, ious)
    return out


def contour_boxes(binary: np.ndarray) -> np.ndarray:
    """Boxes of every contour of a (H, W) mask, as wsolevaluation (``cv2.RETR_TREE``, ``boundingRect``).

    Box ``[x, y, min(x + w, W - 1), min(y + h, H - 1)]``; ``[[0, 0, 0, 0]]`` when the mask is empty. Without opencv,
    the boxes of the 8-connected components (the outer contours; hole contours are missing).
    """
    H, W = binary.shape
    try:
        import cv2
    except ImportError:  # pragma: no cover - opencv is part of the vitzoo[wsol] extra
        cv2 = None
    if cv2 is not None:
        contours = cv2.findContours(binary.astype(np.uint8) * 255, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
        if not contours:
            return np.zeros((1, 4), dtype=np.int64)
        rects = np.array([cv2.boundingRect(c) for c in contours], dtype=np.int64).reshape(-1, 4)
    else:
        ndimage = _ndimage()
        labels, n = ndimage.label(binary, structure=np.ones((3, 3), dtype=bool))
        if n == 0:
            return np.zeros((1, 4), dtype=np.int64)
        rects = np.array([[s[1].start, s[0].start, s[1].stop - s[1].start, s[0].stop - s[0].start]
                          for s in ndimage.find_objects(labels)], dtype=np.int64)
    x, y, w, h = rects.T
    return np.stack([x, y, np.minimum(x + w, W - 1), np.minimum(y + h, H - 1)], axis=1)


def best_iou_per_threshold(
        scoremap: ArrayLike,
        gt_boxes: ArrayLike,
        cam_thresholds: Sequence[float],
) -> np.ndarray:
    """MaxBoxAccV2 core: for each map threshold, the best IoU of any contour box against any GT box.

    Args:
        scoremap: (H, W) map in [0, 1] (min-max normalised, at the eval crop size).
        gt_boxes: (k, 4) GT boxes.
        cam_thresholds: Thresholds tau; as wsolevaluation, the map is quantised to uint8 and a pixel is foreground when
            its value exceeds ``int(tau * max)``.

    Returns:
        (T,) float64 best IoUs.
    """
    img = (_to_numpy(scoremap, np.float32) * 255).astype(np.uint8)
    gt = _to_numpy(gt_boxes, np.float64).reshape(-1, 4)
    peak = int(img.max())
    out = np.zeros(len(cam_thresholds))
    cache: Dict[int, float] = {}
    for i, tau in enumerate(cam_thresholds):
        t = int(tau * peak)
        if t not in cache:  # neighbouring taus often give the same integer threshold
            cache[t] = float(box_iou(contour_boxes(img > t), gt).max())
        out[i] = cache[t]
    return out


class WSOLMeter:
    """Accumulates the localization metrics over batches (see the module docstring).

    Args:
        thresholds: Map thresholds for the SAT-style single-box metrics (SAT: 0.4 on CUB, 0.3 on ImageNet).
        iou_thresholds: IoU levels of the IoU-accuracy columns and of MaxBoxAccV2.
        cam_curve_interval: MaxBoxAccV2 threshold step (wsolevaluation: 0.01 in its recipes); 0 disables MaxBoxAccV2.
        crop_size: Eval crop (H, W) the boxes live in (an int for square).
    """

    def __init__(
            self,
            thresholds: Sequence[float] = (0.4,),
            iou_thresholds: Sequence[float] = (0.3, 0.5, 0.7),
            cam_curve_interval: float = 0.01,
            crop_size: Union[int, Tuple[int, int]] = 224,
    ):
        if not thresholds:
            raise ValueError('thresholds must not be empty')
        self.thresholds = [float(t) for t in thresholds]
        self.iou_thresholds = [float(t) for t in iou_thresholds]
        if 0.5 not in self.iou_thresholds:
            raise ValueError('iou_thresholds must contain 0.5 (the GT-known / Top-k Loc criterion)')
        self.cam_thresholds = list(np.arange(0, 1, cam_curve_interval)) if cam_curve_interval > 0 else []
        self.crop_size = _size2(crop_size)
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.cls_top1 = 0
        self.cls_top5 = 0
        self.ious: List[np.ndarray] = []  # per batch (B, len(thresholds))
        self.top1: List[np.ndarray] = []
        self.top5: List[np.ndarray] = []
        self.full_ious: List[np.ndarray] = []
        self.curve_ious: List[np.ndarray] = []  # per batch (B, T)

    def update(
            self,
            loc_maps: ArrayLike,
            gt_boxes: Sequence[ArrayLike],
            logits: Optional[ArrayLike] = None,
            targets: Optional[ArrayLike] = None,
    ) -> Dict[str, np.ndarray]:
        """Add a batch.

        Args:
            loc_maps: (B, h, w) raw localization maps (normalised and upsampled to ``crop_size`` here).
            gt_boxes: B arrays (k_i, 4) of GT boxes in crop pixels (several per image allowed).
            logits: (B, num_classes) class scores (None: the Top-k Loc columns count as 0).
            targets: (B,) labels.

        Returns:
            This batch's ``boxes`` (len(thresholds), B, 4), ``ious`` (B, len(thresholds)) and the normalised,
            upsampled ``maps`` (B, H, W).
        """
        maps = normalize_maps(loc_maps, self.crop_size)
        B = maps.shape[0]
        if len(gt_boxes) != B:
            raise ValueError(f'{B} maps but {len(gt_boxes)} GT box lists')
        gt_boxes = [_to_numpy(g, np.float64).reshape(-1, 4) for g in gt_boxes]
        boxes = np.stack([largest_component_boxes((maps > t).numpy()) for t in self.thresholds])
        ious = np.stack([max_iou(b, gt_boxes) for b in boxes], axis=1)
        H, W = self.crop_size
        full = max_iou(np.tile([0, 0, W, H], (B, 1)), gt_boxes)
        if logits is not None and targets is not None:
            logits_t = torch.as_tensor(_to_numpy(logits, np.float32))
            targets_t = torch.as_tensor(_to_numpy(targets, np.int64)).reshape(-1)
            k = min(5, logits_t.shape[1])
            rank = logits_t.topk(k, dim=1).indices
            top1 = (rank[:, 0] == targets_t).numpy()
            top5 = (rank == targets_t[:, None]).any(dim=1).numpy()
        else:
            top1 = top5 = np.zeros(B, dtype=bool)
        self.cls_top1 += int(top1.sum())
        self.cls_top5 += int(top5.sum())
        self.top1.append(top1)
        self.top5.append(top5)
        self.ious.append(ious)
        self.full_ious.append(full)
        if self.cam_thresholds:
            self.curve_ious.append(np.stack([
                best_iou_per_threshold(maps[i].numpy(), gt_boxes[i], self.cam_thresholds) for i in range(B)]))
        self.count += B
        return {'boxes': boxes, 'ious': ious, 'maps': maps}

    def compute(self) -> Dict[str, Any]:
        """The metrics in percent: ``top1`` / ``top5`` (classification), per threshold ``loc`` entries, the whole-crop
        ``baseline`` and ``maxboxacc`` (per IoU level, with the best tau) / ``maxboxacc_v2``."""
        if self.count == 0:
            raise RuntimeError('WSOLMeter.compute() called before any update()')
        n = self.count
        ious = np.concatenate(self.ious)
        top1 = np.concatenate(self.top1)
        top5 = np.concatenate(self.top5)
        full = np.concatenate(self.full_ious)

        def acc(mask: np.ndarray) -> float:
            return float(100.0 * mask.sum() / n)

        def iou_cols(v: np.ndarray) -> Dict[str, float]:
            return {f'iou{int(round(d * 100))}': acc(v >= d) for d in self.iou_thresholds}

        loc = {}
        for j, t in enumerate(self.thresholds):
            v = ious[:, j]
            cols = iou_cols(v)
            loc[t] = {'gt_known': acc(v >= 0.5), 'top1_loc': acc(top1 & (v >= 0.5)), 'top5_loc': acc(top5 & (v >= 0.5)),
                      **cols, 'iou_mean': float(np.mean(list(cols.values()))), 'mean_iou': float(v.mean())}
        out: Dict[str, Any] = {
            'num_images': n, 'top1': acc(top1), 'top5': acc(top5), 'loc': loc,
            'baseline': {'gt_known': acc(full >= 0.5), 'top1_loc': acc(top1 & (full >= 0.5)), **iou_cols(full),
                         'mean_iou': float(full.mean())},
        }
        if self.curve_ious:
            curve = np.concatenate(self.curve_ious)  # (n, T)
            per_delta = {}
            for d in self.iou_thresholds:
                box_acc = 100.0 * (curve >= d).mean(axis=0)
                best = int(np.argmax(box_acc))
                per_delta[f'iou{int(round(d * 100))}'] = {'maxboxacc': float(box_acc[best]),
                                                          'best_cam_threshold': float(self.cam_thresholds[best])}
            out['maxboxacc'] = per_delta
            out['maxboxacc_v2'] = float(np.mean([v['maxboxacc'] for v in per_delta.values()]))
        return out
