"""mmseg 1.x segmentor with the attention diversification loss (ADL) of TAP + ADL, logged as ``loss_ad``.

Robustifying Token Attention for Vision Transformers (Guo, Stutz, Schiele, ICCV 2023) - https://arxiv.org/abs/2303.11126
Official code: https://github.com/guoyongcs/TAPADL (``TAPADL_FAN/segmentation/mmseg/models/segmentors/
encoder_decoder.py``, a fork of mmseg 0.13).

The official segmentor forks mmseg's ``EncoderDecoder``: its backbone returns ``(feats, attn)`` in training and the
ADL of the attention maps is added to the decode losses as ``loss_ad`` (``train_cfg=dict(adloss=1)`` is only a flag,
the weight is 1). Here :class:`ADLEncoderDecoder` subclasses mmseg 1.x's own ``EncoderDecoder`` and changes only
``loss()``: the backbone (:class:`vitzoo._mm.TAPFAN`, or any backbone with ``record_attention()`` /
``pop_attention()``) keeps its attention maps for that one forward, and ``loss_ad = loss_weight * ADL(maps)`` is added
to the loss dict. Prediction, ``_forward`` and slide / whole inference are mmseg's, with fused attention.

Fixed from the original: its ADL squeezes the head-averaged map, so with one image per GPU (the official recipe:
4 GPUs x 1 image) the "mean attention row" becomes the per-query mean 1/N, falls under the threshold 2/N and is
zeroed, and ``loss_ad`` is exactly 0 (no gradient) in every iteration. :func:`vitzoo.losses.adl.
attention_diversification_loss` keeps the batch axis, so the loss works for any batch size; set
``loss_ad=dict(loss_weight=0.)`` to train what the official recipe effectively trained.
"""
from typing import Any, Dict, Optional

from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS

from vitzoo.losses.adl import AttentionDiversificationLoss

__all__ = ['ADLEncoderDecoder']


@MODELS.register_module()
class ADLEncoderDecoder(EncoderDecoder):
    """mmseg ``EncoderDecoder`` whose training loss adds ``loss_ad``, the ADL of the backbone's attention maps.

    Args:
        loss_ad: ``dict(loss_weight=1.0, threshold=2.0)`` (official ``--adloss`` / ``--threshold``); a weight of 0
            turns the loss off (then training is the plain ``EncoderDecoder``). Without it, an official-style
            ``train_cfg=dict(adloss=w)`` sets the weight.
        *args, **kwargs: As mmseg's ``EncoderDecoder``.
    """

    def __init__(self, *args, loss_ad: Optional[Dict[str, Any]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        cfg: Dict[str, Any] = dict(loss_weight=1.0, threshold=2.0)
        if loss_ad is None and self.train_cfg and 'adloss' in self.train_cfg:
            cfg['loss_weight'] = float(self.train_cfg['adloss'])
        unknown = set(loss_ad or {}) - set(cfg)
        if unknown:
            raise ValueError(f'ADLEncoderDecoder: loss_ad takes loss_weight and threshold, got {sorted(unknown)}')
        cfg.update(loss_ad or {})
        self.adl = AttentionDiversificationLoss(weight=float(cfg['loss_weight']), threshold=float(cfg['threshold']))
        if self.adl.weight > 0 and not hasattr(self.backbone, 'record_attention'):
            raise TypeError(f'ADLEncoderDecoder: the backbone {type(self.backbone).__name__} does not expose '
                            f'attention maps (record_attention / pop_attention); use TAPFAN or loss_weight=0')

    def loss(self, inputs, data_samples) -> dict:
        """mmseg's decode (and auxiliary) losses, plus ``loss_ad`` when its weight is positive."""
        if self.adl.weight <= 0:
            return super().loss(inputs, data_samples)
        with self.backbone.record_attention():
            losses = super().loss(inputs, data_samples)
        losses['loss_ad'] = self.adl(self.backbone.pop_attention())
        return losses
