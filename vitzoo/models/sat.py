"""SAT: DeiT with a spatial-aware token for weakly supervised object localization

Spatial-Aware Token for Weakly Supervised Object Localization (Wu, Zhai, Cao, Luo, Zha; ICCV 2023)
    - https://arxiv.org/abs/2303.10438
Official code: https://github.com/wpy1999/SAT (``Model/SAT.py``).

A DeiT with one learnable spatial token appended **after** the patch tokens (sequence ``[cls, patches, loc]``). Its
query row gives a sigmoid foreground mask in every block; the last ``num_spatial_blocks`` blocks (3 of 12 in the
released models: blocks 9-11) multiply their softmaxed attention by it (see :mod:`vitzoo.layers.spatial_token`). The
classifier is a 3x3 conv over the patch grid followed by global average pooling.

Localization: :meth:`SATVisionTransformer.forward_loc` returns ``(logits, loc_map)``, the map being the mean of the
spatial-aware blocks' masks over the patch tokens, shape (B, h, w). Train with :class:`vitzoo.losses.sat.SATLoss` (CE +
batch area loss + normalization loss on the Gaussian-filtered map); extract boxes and metrics with :mod:`vitzoo.wsol`.

Parameter names follow the official checkpoints, which load unchanged (``{'model': ...}`` with DataParallel / DDP
``module.`` prefixes) through :func:`checkpoint_filter_fn`; so do timm / FB DeiT checkpoints (the official
initialisation: the spatial token, its position embedding and the conv head keep their random init).

Changes from the original (fixes of its known limits, see the vitzoo SAT spec):
    - Any input resolution: the original hard-codes a 14x14 grid (224 px); here the position table is resized to the
      token grid at run time and the map has the grid's shape. Sizes that are not a multiple of the patch size raise
      a ValueError.
    - The fixed 3x3 Gaussian of the normalization loss was a frozen ``nn.Parameter`` named ``weight``: it lives in the
      loss (:mod:`vitzoo.losses.sat`, a buffer of ``SATLoss``), and the checkpoint filter drops the key, so every
      parameter of the model is trainable and receives a gradient.
    - The spatial-aware blocks are the last ``num_spatial_blocks`` blocks (the original tests ``cur_depth >= 9`` and
      averages the last 3 masks, which agree only for depth 12); masks of the other blocks are only computed on demand.
    - timm interface: fused attention, ``features_only``, grad checkpointing, ``forward_intermediates``; the entrypoints
      accept timm's extra kwargs (the original's break under ``timm.create_model``).
    - ``drop_rate`` is timm's head dropout; the original's ``drop_rate`` (position / projection / MLP dropout) maps to
      ``pos_drop_rate`` and ``proj_drop_rate``.

Written for vitzoo.
"""
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from timm.layers import use_fused_attn
from timm.models import generate_default_cfgs, register_model

from vitzoo.layers.pooled_conv import conv2d_mean
from vitzoo.layers.spatial_token import SpatialTokenAttention, fuse_spatial_masks
from ._blocks import PreNormBlock
from ._builder import build_model_with_cfg
from ._helpers import embed_patches, finish_state_dict, has_forward_hooks, unwrap_state_dict
from ._manifest import manifest_cfg
from ._vit import BlockState, DeiTShell, adapt_embeddings, deit_build_kwargs, deit_cfg

__all__ = ['SATVisionTransformer']

_logger = logging.getLogger(__name__)


class Block(PreNormBlock):
    """Pre-norm transformer block whose attention also yields the spatial token's mask: returns ``(x, mask)``.

    ``kwargs``: the other arguments of :class:`~vitzoo.models._vit.PreNormBlock` (``mlp_ratio``, ``qkv_bias``, ...).
    """

    def __init__(self, dim: int, num_heads: int, spatial_aware: bool = False, **kwargs):
        super().__init__(
            dim, num_heads, SpatialTokenAttention, spatial_aware=spatial_aware, fused_attn=use_fused_attn(), **kwargs)

    @property
    def spatial_aware(self) -> bool:
        return self.attn.spatial_aware


@dataclass
class _SATState(BlockState):
    need_mask: bool = False  # every block's mask, not only the spatial-aware blocks'
    masks: List[Optional[torch.Tensor]] = field(default_factory=list)  # per block (B, N), None where not computed


class SATVisionTransformer(DeiTShell):
    """DeiT with a spatial-aware token (SAT) and a 3x3 conv classification head.

    The token sequence is ``[cls, patches, loc]``. ``forward`` returns logits (timm convention); :meth:`forward_loc`
    returns ``(logits, loc_map)``. ``forward_features`` returns the normalised patch tokens as a (B, C, h, w) map (the
    conv head's input).

    Args:
        global_pool: 'avg' (mean of the head's class maps, as the original) or '' (return the class maps).
        depth: Blocks.
        num_spatial_blocks: The last blocks gate their attention by the spatial mask; their masks form the map.
        kwargs: The ViT arguments of :class:`~vitzoo.models._vit.DeiTShell` (``img_size`` sets the position table;
            other resolutions run too), e.g. ``embed_dim``, ``num_heads``, ``drop_path_rate``.
    """

    global_pools = ('avg', '')
    state_cls = _SATState

    def __init__(
            self,
            *,
            global_pool: str = 'avg',
            depth: int = 12,
            num_spatial_blocks: int = 3,
            **kwargs,
    ):
        self._check_global_pool(global_pool)
        if not 1 <= num_spatial_blocks <= depth:
            raise ValueError(f'num_spatial_blocks must be in [1, depth={depth}], got {num_spatial_blocks}')
        spatial_blocks = tuple(range(depth - num_spatial_blocks, depth))

        def block_fn(i: int, grid_size: Tuple[int, int], **block_args) -> Block:
            return Block(**block_args, spatial_aware=i in spatial_blocks)

        super().__init__(block_fn, global_pool=global_pool, depth=depth, **kwargs)

    @property
    def spatial_blocks(self) -> Tuple[int, ...]:
        """Indices of the spatial-aware blocks (those left after ``prune_intermediate_layers``)."""
        return tuple(i for i, blk in enumerate(self.blocks) if blk.spatial_aware)

    def _make_tokens(self, embed_dim: int, num_patches: int) -> None:
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.loc_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.loc_embed = nn.Parameter(torch.zeros(1, 1, embed_dim))

    def _make_head(self, num_classes: int) -> nn.Module:
        # PyTorch's default conv init, as the original (its _init_weights only touches Linear / LayerNorm)
        return nn.Conv2d(self.embed_dim, num_classes, 3, 1, 1) if num_classes > 0 else nn.Identity()

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x, pos, hw = embed_patches(self, x)
        B = x.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), x, self.loc_token.expand(B, -1, -1)], 1)
        return self.pos_drop(x + torch.cat([pos, self.loc_embed], dim=1)), hw

    def _run_block(self, i: int, blk: nn.Module, x: torch.Tensor, state: _SATState) -> torch.Tensor:
        x, mask = self._checkpointed(blk, x, state.need_mask)
        state.masks.append(mask)
        return x

    def _split_tokens(self, x: torch.Tensor, state: BlockState) -> Tuple[torch.Tensor, torch.Tensor]:
        # the class and spatial tokens (B, 2, C) are the "prefix" tokens of forward_intermediates
        return x[:, 1:-1], torch.cat([x[:, :1], x[:, -1:]], dim=1)

    def _output(self, x: torch.Tensor, state: BlockState) -> torch.Tensor:
        """Normalised patch tokens as a (B, C, h, w) map."""
        return self._to_map(x[:, 1:-1], state.hw)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) if self.global_pool == 'avg' else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Conv 3x3 head + global average pooling on a (B, C, h, w) feature map.

        With ``pre_logits`` the pooled features (B, C) are returned (the head is a conv, so these are the average patch
        features it sees, not a linear head's input); with ``global_pool=''`` the unpooled maps are returned. The
        pooled logits are computed without the class maps (:func:`vitzoo.layers.pooled_conv.conv2d_mean`: the same
        values, ~1/200 of the head's FLOPs at 14x14) unless hooks on ``head`` expect it to be called.
        """
        x = self.head_drop(x)
        if pre_logits:
            return self.pool(x)
        if self.global_pool == 'avg' and self._pooled_head():
            return conv2d_mean(x, self.head.weight, self.head.bias, self.head.padding)
        return self.pool(self.head(x))

    @torch.jit.ignore
    def _pooled_head(self) -> bool:
        h = self.head
        return (type(h) is nn.Conv2d and h.stride == (1, 1) and h.dilation == (1, 1) and h.groups == 1
                and h.padding_mode == 'zeros' and not isinstance(h.padding, str) and not has_forward_hooks(h))

    def forward_loc(
            self,
            x: torch.Tensor,
            return_masks: bool = False,
    ) -> Union[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]]:
        """Logits and the localization map (the official ``phase='test'`` outputs), at any resolution.

        Args:
            x: (B, 3, H, W) images.
            return_masks: Also return every block's spatial mask over the patches, (B, h, w) each.

        Returns:
            ``(logits, loc_map)`` with ``loc_map`` (B, h, w) in (0, 1): the mean of the spatial-aware blocks' masks
            over the patch tokens (h, w = H / patch, W / patch); plus the per-block masks if requested. Train with
            :class:`vitzoo.losses.sat.SATLoss` on ``(logits, loc_map)``.
        """
        if not self.spatial_blocks:
            raise RuntimeError('forward_loc needs the spatial-aware blocks (pruned by prune_intermediate_layers?)')
        tokens, state, _ = self._forward_tokens(x, need_mask=return_masks)
        logits = self.forward_head(self._output(tokens, state))
        masks, hw = state.masks, state.hw
        loc_map = fuse_spatial_masks([masks[i] for i in self.spatial_blocks], hw)
        if return_masks:
            return logits, loc_map, [fuse_spatial_masks([m], hw) for m in masks]
        return logits, loc_map


def checkpoint_filter_fn(state_dict: Dict, model: SATVisionTransformer) -> Dict[str, torch.Tensor]:
    """Load an official SAT checkpoint or a timm / FB DeiT checkpoint into ``model``.

    - Official SAT (``{'model': ..., 'best_thr': ..., 'epoch': ...}``, keys prefixed ``module.``): prefixes stripped,
      the fixed Gaussian ``weight`` dropped (it is not a model parameter here).
    - DeiT (the official initialisation): the linear ``head`` / ``head_dist`` and ``dist_token`` are dropped (with the
      distillation row of ``pos_embed``); ``loc_token``, ``loc_embed`` and the conv ``head`` keep the model's init.

    ``pos_embed`` is resized when the model was built at another resolution. Every key and shape is checked, raising
    :class:`~vitzoo.models._helpers.CheckpointError` that names the key.
    """
    state_dict = unwrap_state_dict(state_dict)
    target = model.state_dict()
    # a DeiT has neither SAT key (a SAT checkpoint missing only one of them is an error, reported below)
    is_deit = 'loc_token' not in state_dict and 'loc_embed' not in state_dict and 'cls_token' in state_dict
    out = {}
    for k, v in state_dict.items():
        if k == 'weight' and v.dim() == 4 and v.shape[:2] == (1, 1):
            continue  # the original's frozen Gaussian kernel: a buffer of vitzoo.losses.sat.SATLoss now
        if is_deit and (k.startswith('head_dist.') or k == 'dist_token' or (k.startswith('head.') and v.dim() != 4)):
            continue
        if k == 'pos_embed' and 'dist_token' in state_dict:
            v = torch.cat([v[:, :1], v[:, 2:]], dim=1)  # drop the distillation token's row
        out[k] = v
    adapt_embeddings(out, model)
    if is_deit:
        kept = [k for k in ('loc_token', 'loc_embed', 'head.weight', 'head.bias') if k in target and k not in out]
        for k in kept:
            out[k] = target[k]
        _logger.info(f'Initialised from a DeiT checkpoint; {", ".join(kept)} keep their random init.')
    return finish_state_dict(out, model)


def _create_sat(variant: str, pretrained: bool = False, **kwargs) -> SATVisionTransformer:
    return build_model_with_cfg(
        SATVisionTransformer, variant, pretrained, **deit_build_kwargs(checkpoint_filter_fn, **kwargs))


# the official eval: Resize((256, 256)) (aspect-distorting) -> CenterCrop(224), bilinear == timm's 'squash' mode
_cfg = partial(
    deit_cfg, crop_mode='squash', interpolation='bilinear', paper_ids='arXiv:2303.10438',
    paper_name='Spatial-Aware Token for Weakly Supervised Object Localization',
    origin_url='https://github.com/wpy1999/SAT')


def _deit_init_cfg(deit: str, file: str) -> Dict:
    # The official training's initialisation (``Model/SAT.py``, ``pretrained=True``): FB's DeiT ImageNet weights, the
    # same tensors timm hosts as ``<deit>.fb_in1k``. checkpoint_filter_fn maps them; the spatial token, its position
    # embedding and the conv head keep their init. Use with ``pretrained=True`` to start a SAT training.
    return _cfg(hf_hub_id=f'timm/{deit}.fb_in1k', url=f'https://dl.fbaipublicfiles.com/deit/{file}',
                license='apache-2.0', description=f'{deit} ImageNet-1k weights (FB DeiT), the official SAT '
                                                  f'initialisation; not a trained SAT model')


default_cfgs = generate_default_cfgs({
    'sat_deit_tiny.in1k': _cfg(),
    'sat_deit_small.in1k': _cfg(**manifest_cfg('sat_deit_small.in1k')),
    'sat_deit_small.cub': _cfg(num_classes=200, **manifest_cfg('sat_deit_small.cub')),
    'sat_deit_base.in1k': _cfg(),
    'sat_deit_tiny.fb_in1k': _deit_init_cfg('deit_tiny_patch16_224', 'deit_tiny_patch16_224-a1311bcf.pth'),
    'sat_deit_small.fb_in1k': _deit_init_cfg('deit_small_patch16_224', 'deit_small_patch16_224-cd65a155.pth'),
    'sat_deit_base.fb_in1k': _deit_init_cfg('deit_base_patch16_224', 'deit_base_patch16_224-b5f2ef4d.pth'),
})
# The bare names stay SAT's own models (timm would make the tag with a download, fb_in1k, the default).
for _arch in default_cfgs:
    default_cfgs[_arch].tags.remove('fb_in1k')
    default_cfgs[_arch].tags.append('fb_in1k')


@register_model
def sat_deit_tiny(pretrained: bool = False, **kwargs) -> SATVisionTransformer:
    """SAT DeiT-T @ 224 (blocks 9-11 spatial-aware). 7.3M params, 1.6 GFLOPs (1000 classes); no released weights."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4, num_spatial_blocks=3)
    return _create_sat('sat_deit_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def sat_deit_small(pretrained: bool = False, **kwargs) -> SATVisionTransformer:
    """SAT DeiT-S @ 224 (released). 25.1M params, 5.3 GFLOPs (1000 classes; CUB, 200: 22.4M, 4.8 GFLOPs).

    Top-1 / Top-5 / GT-known Loc: CUB 80.96 / 94.13 / 98.45, ILSVRC 60.15 / 70.52 / 73.13.
    """
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, num_spatial_blocks=3)
    return _create_sat('sat_deit_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def sat_deit_base(pretrained: bool = False, **kwargs) -> SATVisionTransformer:
    """SAT DeiT-B @ 224 (blocks 9-11 spatial-aware). 92.7M params, 19.0 GFLOPs (1000 classes); no released weights."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, num_spatial_blocks=3)
    return _create_sat('sat_deit_base', pretrained=pretrained, **dict(model_args, **kwargs))
