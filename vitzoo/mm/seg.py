"""mmseg 1.x parts of TAP + ADL segmentation: the ADL segmentor (``loss_ad``) and the SegFormer MLP head.

Robustifying Token Attention for Vision Transformers (Guo, Stutz, Schiele, ICCV 2023) - https://arxiv.org/abs/2303.11126
Official code: https://github.com/guoyongcs/TAPADL (``TAPADL_FAN/segmentation/mmseg/models/segmentors/
encoder_decoder.py``, a fork of mmseg 0.13).

The official segmentor forks mmseg's ``EncoderDecoder``: its backbone returns ``(feats, attn)`` in training and the
ADL of the attention maps is added to the decode losses as ``loss_ad`` (``train_cfg=dict(adloss=1)`` is only a flag,
the weight is 1). Here :class:`ADLEncoderDecoder` subclasses mmseg 1.x's own ``EncoderDecoder`` and changes only
``loss()``: the backbone (:class:`vitzoo.mm.TAPFAN`, or any backbone with ``record_attention()`` /
``pop_attention()``) keeps its attention maps for that one forward, and ``loss_ad = loss_weight * ADL(maps)`` is added
to the loss dict. Prediction, ``_forward`` and slide / whole inference are mmseg's, with fused attention.

Fixed from the original: its ADL squeezes the head-averaged map, so with one image per GPU (the official recipe:
4 GPUs x 1 image) the "mean attention row" becomes the per-query mean 1/N, falls under the threshold 2/N and is
zeroed, and ``loss_ad`` is exactly 0 (no gradient) in every iteration. :func:`vitzoo.losses.adl.
attention_diversification_loss` keeps the batch axis, so the loss works for any batch size; set
``loss_ad=dict(loss_weight=0.)`` to train what the official recipe effectively trained.

:class:`SegFormerMLPHead` is the official decode head (``TAPADL_FAN/segmentation/mmseg/models/decode_heads/
segformer_head.py``, the SegFormer fork's all-MLP ``SegFormerHead``) for mmseg 1.x, with the official parameter names,
so the released segmentation checkpoint's ``decode_head.*`` tensors load as they are. mmseg 1.x's own
``SegformerHead`` is a different head (a 1x1 conv + BN + ReLU per map, maps concatenated finest first).
"""
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmcv.cnn import ConvModule
from mmengine.logging import MMLogger
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.models.segmentors import EncoderDecoder
from mmseg.models.utils import resize
from mmseg.registry import MODELS

from vitzoo.losses.adl import AttentionDiversificationLoss
from .checkpoint import PretrainedInitMixin, fit_problems, read_state_dict

__all__ = ['ADLEncoderDecoder', 'SegFormerMLPHead']


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


class _LinearEmbed(nn.Module):
    """A Linear over the channels of a (B, C, H, W) map, returned as tokens (B, H*W, E); ``proj`` as the official."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(2).transpose(1, 2))


@MODELS.register_module()
class SegFormerMLPHead(PretrainedInitMixin, BaseDecodeHead):
    """The SegFormer all-MLP decode head of the official TAP + ADL segmentation (mmseg 0.x ``SegFormerHead``).

    For maps c1..c4 (finest first): a Linear per map to ``embed_dim`` channels (``linear_c{i}.proj``), c2..c4
    bilinearly resized to c1's size (``align_corners=False``, fixed in the official forward), concatenated in the
    official order c4, c3, c2, c1, then ``linear_fuse`` (1x1 conv without bias + ``norm_cfg`` norm + ReLU), dropout
    and ``linear_pred`` (1x1 conv to the classes). Losses and ``predict`` are mmseg 1.x's ``BaseDecodeHead``'s (they
    resize the logits with the head's ``align_corners``).

    The official base head always builds ``conv_seg`` (``channels`` -> classes), which this head never uses; it is
    kept, frozen, so the state dict is the official one (the released checkpoint has it) and DDP sees no unused
    trainable parameter (the official config needs ``find_unused_parameters=True`` for it; AdamW never updated it).

    Weights of an official or mm segmentation checkpoint: ``init_cfg=dict(type='Pretrained', checkpoint=PATH)``
    takes the ``decode_head.`` keys (or those under ``prefix``) and loads them strictly.

    Args:
        feature_strides: Strides of the input maps, checked as the official head does (the computation does not use
            them: every map is resized to c1's size).
        decoder_params: ``dict(embed_dim=768)``, the official decoder width.
        **kwargs: As mmseg's ``BaseDecodeHead`` (``in_channels`` of the 4 maps, ``in_index``, ``channels`` (only
            ``conv_seg``'s width; official 256), ``num_classes``, ``dropout_ratio``, ``norm_cfg``, ``act_cfg``,
            ``align_corners``, ``loss_decode``, ...); ``input_transform`` is always 'multiple_select'.
    """

    def __init__(self, feature_strides: Sequence[int] = (4, 8, 16, 32), decoder_params: Optional[dict] = None,
                 **kwargs):
        transform = kwargs.pop('input_transform', 'multiple_select')
        if transform != 'multiple_select':
            raise ValueError(f"SegFormerMLPHead: input_transform is always 'multiple_select', got {transform!r}")
        super().__init__(input_transform='multiple_select', **kwargs)
        if len(self.in_channels) != 4:
            raise ValueError(f'SegFormerMLPHead: needs 4 input maps (c1..c4), got in_channels={self.in_channels}')
        strides = [int(s) for s in feature_strides]
        if len(strides) != len(self.in_channels) or min(strides) != strides[0]:
            raise ValueError(f'SegFormerMLPHead: feature_strides must give one stride per input map, the first the '
                             f'smallest; got {feature_strides} for {len(self.in_channels)} maps')
        self.feature_strides = strides
        params = dict(decoder_params or {})
        unknown = set(params) - {'embed_dim'}
        if unknown:
            raise ValueError(f'SegFormerMLPHead: decoder_params takes embed_dim, got {sorted(unknown)}')
        self.embed_dim = embed_dim = int(params.get('embed_dim', 768))
        c1, c2, c3, c4 = self.in_channels
        self.linear_c4 = _LinearEmbed(c4, embed_dim)
        self.linear_c3 = _LinearEmbed(c3, embed_dim)
        self.linear_c2 = _LinearEmbed(c2, embed_dim)
        self.linear_c1 = _LinearEmbed(c1, embed_dim)
        # the official hard-codes SyncBN here; its config passes SyncBN as norm_cfg too, which is used here
        self.linear_fuse = ConvModule(4 * embed_dim, embed_dim, kernel_size=1, conv_cfg=self.conv_cfg,
                                      norm_cfg=self.norm_cfg, act_cfg=self.act_cfg)
        self.linear_pred = nn.Conv2d(embed_dim, self.out_channels, kernel_size=1)
        self.conv_seg.requires_grad_(False)

    def forward(self, inputs: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Logits (B, classes, H1, W1) at the size of the first selected map."""
        c1, c2, c3, c4 = self._transform_inputs(inputs)
        size = c1.shape[2:]
        outs = []
        for x, embed in ((c4, self.linear_c4), (c3, self.linear_c3), (c2, self.linear_c2), (c1, self.linear_c1)):
            y = embed(x).transpose(1, 2).reshape(x.shape[0], -1, x.shape[2], x.shape[3])
            if x is not c1:  # the official resizes c2..c4 with align_corners=False whatever the config says
                y = resize(y, size=size, mode='bilinear', align_corners=False)
            outs.append(y)
        y = self.linear_fuse(torch.cat(outs, dim=1))
        if self.dropout is not None:
            y = self.dropout(y)
        return self.linear_pred(y)

    def load_pretrained(self, checkpoint: str, prefix: Optional[str] = None) -> None:
        """Load the head of a segmentation checkpoint (official or mm; strict: every key and shape must fit).

        Args:
            checkpoint: Path or URL (local files are read weights-only, see :func:`vitzoo.mm.load_checkpoint_file`).
            prefix: Take the keys under this prefix; 'decode_head.' when the checkpoint has such keys.
        """
        state_dict, prefix = read_state_dict(checkpoint, prefix, 'decode_head.')
        problems = fit_problems(self.state_dict(), state_dict, limit=5)
        if problems:
            raise RuntimeError(f'SegFormerMLPHead: checkpoint {os.path.basename(str(checkpoint))} (prefix '
                               f'{prefix!r}) does not fit: ' + '; '.join(problems))
        self.load_state_dict(state_dict, strict=True)
        MMLogger.get_current_instance().info(f'SegFormerMLPHead: loaded {len(state_dict)} tensors of {checkpoint}')
