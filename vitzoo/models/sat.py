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
from functools import partial
from typing import Callable, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, PatchEmbed, resample_abs_pos_embed, trunc_normal_, use_fused_attn
from timm.models import checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from vitzoo.layers.spatial_token import SpatialTokenAttention, fuse_spatial_masks
from vitzoo.weights import build_model_with_cfg, manifest_cfg
from ._helpers import Mlp, check_state_dict, embed_patches, unwrap_state_dict

__all__ = ['SATVisionTransformer']

_logger = logging.getLogger(__name__)


class Block(nn.Module):
    """Pre-norm transformer block whose attention also yields the spatial token's mask."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
            drop_path: float = 0.0,
            act_layer: Callable = nn.GELU,
            norm_layer: Callable = nn.LayerNorm,
            spatial_aware: bool = False,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = SpatialTokenAttention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
            spatial_aware=spatial_aware, fused_attn=use_fused_attn())
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    @property
    def spatial_aware(self) -> bool:
        return self.attn.spatial_aware

    def forward(self, x: torch.Tensor, need_mask: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        y, mask = self.attn(self.norm1(x), need_mask=need_mask)
        x = x + self.drop_path1(y)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x, mask


class SATVisionTransformer(nn.Module):
    """DeiT with a spatial-aware token (SAT) and a 3x3 conv classification head.

    ``forward`` returns logits (timm convention); :meth:`forward_loc` returns ``(logits, loc_map)``.
    ``forward_features`` returns the normalised patch tokens as a (B, C, h, w) map (the conv head's input).

    Args:
        img_size: Construction resolution (sets the position table; other resolutions run too).
        patch_size: Patch size.
        in_chans: Input channels.
        num_classes: Classes (0 = no head).
        global_pool: 'avg' (mean of the head's class maps, as the original) or '' (return the class maps).
        embed_dim: Width.
        depth: Blocks.
        num_heads: Heads.
        mlp_ratio: MLP expansion.
        qkv_bias: Bias in qkv.
        num_spatial_blocks: The last blocks gate their attention by the spatial mask; their masks form the map.
        drop_rate: Dropout before the head.
        pos_drop_rate: Dropout after adding the position embedding.
        proj_drop_rate: Dropout after projections / MLP.
        attn_drop_rate: Attention dropout.
        drop_path_rate: Stochastic depth (linear rule).
        norm_layer: Norm (default LayerNorm eps 1e-6).
        act_layer: MLP activation.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            num_spatial_blocks: int = 3,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_layer: Optional[Callable] = None,
            act_layer: Optional[Callable] = None,
            **kwargs,
    ):
        super().__init__()
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if not 1 <= num_spatial_blocks <= depth:
            raise ValueError(f'num_spatial_blocks must be in [1, depth={depth}], got {num_spatial_blocks}')
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        act_layer = act_layer or nn.GELU
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1  # class token; the spatial token is a suffix token
        self.grad_checkpointing = False
        self.patch_size = patch_size

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            flatten=False, output_fmt='NHWC', strict_img_size=False)
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.loc_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1] + 1, embed_dim))
        self.loc_embed = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.spatial_blocks = tuple(range(depth - num_spatial_blocks, depth))
        self.blocks = nn.ModuleList([
            Block(
                embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[i], act_layer=act_layer, norm_layer=norm_layer,
                spatial_aware=i in self.spatial_blocks)
            for i in range(depth)])
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._make_head(num_classes)
        self.init_weights()

    def _make_head(self, num_classes: int) -> nn.Module:
        # PyTorch's default conv init, as the original (its _init_weights only touches Linear / LayerNorm)
        return nn.Conv2d(self.embed_dim, num_classes, 3, 1, 1) if num_classes > 0 else nn.Identity()

    def init_weights(self) -> None:
        """The official (DeiT) init: trunc_normal(.02) for Linear and the tokens / embeddings, unit LayerNorms."""
        for p in (self.pos_embed, self.loc_embed, self.cls_token, self.loc_token):
            trunc_normal_(p, std=.02)
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {'pos_embed', 'cls_token', 'loc_embed', 'loc_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r'^cls_token|loc_token|pos_embed|loc_embed|patch_embed',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('avg', ''):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = self._make_head(num_classes)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x, pos, (h, w) = embed_patches(self, x)
        B = x.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), x, self.loc_token.expand(B, -1, -1)], 1)
        return self.pos_drop(x + torch.cat([pos, self.loc_embed], dim=1)), (h, w)

    def _run_block(
            self,
            blk: nn.Module,
            x: torch.Tensor,
            need_mask: bool,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(blk, x, need_mask)
        return blk(x, need_mask)

    def _forward_tokens(
            self,
            x: torch.Tensor,
            all_masks: bool = False,
    ) -> Tuple[torch.Tensor, Tuple[int, int], List[Optional[torch.Tensor]]]:
        """Normalised tokens (B, N, C), the grid and the per-block spatial masks (B, N) (None where not computed)."""
        x, hw = self._embed(x)
        masks = []
        for blk in self.blocks:
            x, m = self._run_block(blk, x, all_masks)
            masks.append(m)
        return self.norm(x), hw, masks

    @staticmethod
    def _patch_map(x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """(B, N, C) tokens -> (B, C, h, w) patch map (class and spatial tokens dropped)."""
        B, _, C = x.shape
        return x[:, 1:-1].reshape(B, hw[0], hw[1], C).permute(0, 3, 1, 2).contiguous()

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Patch features of selected blocks as (B, C, h, w) maps (or (B, h*w, C) with ``output_fmt='NLC'``).

        The final output (first element unless ``intermediates_only``) equals :meth:`forward_features`.

        Args:
            x: Input images.
            indices: Take the last n blocks if an int, these blocks if a list, all if None.
            return_prefix_tokens: Also return the class and spatial tokens (B, 2, C) of each selected block.
            norm: Apply the final norm to each intermediate.
            stop_early: Stop after the last selected block.
            output_fmt: 'NCHW' or 'NLC'.
            intermediates_only: Return only the intermediates.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B = x.shape[0]
        x, (h, w) = self._embed(x)
        blocks = self.blocks if not stop_early else self.blocks[:max_index + 1]
        intermediates = []
        for i, blk in enumerate(blocks):
            x, _ = self._run_block(blk, x, False)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [torch.cat([y[:, :1], y[:, -1:]], dim=1) for y in intermediates]
        intermediates = [y[:, 1:-1] for y in intermediates]
        if output_fmt == 'NCHW':
            intermediates = [y.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self._patch_map(self.norm(x), (h, w)), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks (and optionally norm / head) after the last of ``indices``; returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self.spatial_blocks = tuple(i for i in self.spatial_blocks if i <= max_index)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised patch tokens as a (B, C, h, w) map."""
        x, hw, _ = self._forward_tokens(x)
        return self._patch_map(x, hw)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Conv 3x3 head + global average pooling on a (B, C, h, w) feature map.

        With ``pre_logits`` the pooled features (B, C) are returned (the head is a conv, so these are the average patch
        features it sees, not a linear head's input); with ``global_pool=''`` the unpooled maps are returned.
        """
        x = self.head_drop(x)
        if pre_logits:
            return x.mean(dim=(2, 3)) if self.global_pool == 'avg' else x
        x = self.head(x)
        return x.mean(dim=(2, 3)) if self.global_pool == 'avg' else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

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
        tokens, hw, masks = self._forward_tokens(x, all_masks=return_masks)
        logits = self.forward_head(self._patch_map(tokens, hw))
        loc_map = fuse_spatial_masks([masks[i] for i in self.spatial_blocks], hw)
        if return_masks:
            return logits, loc_map, [fuse_spatial_masks([m], hw) for m in masks]
        return logits, loc_map


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


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
    num_prefix = 2 if 'dist_token' in state_dict else 1
    out = {}
    for k, v in state_dict.items():
        if k == 'weight' and v.dim() == 4 and v.shape[:2] == (1, 1):
            continue  # the original's frozen Gaussian kernel: a buffer of vitzoo.losses.sat.SATLoss now
        if is_deit and (k.startswith('head_dist.') or k == 'dist_token' or (k.startswith('head.') and v.dim() != 4)):
            continue
        if k == 'pos_embed':
            if num_prefix == 2:
                v = torch.cat([v[:, :1], v[:, 2:]], dim=1)  # drop the distillation token's row
            if v.shape != target[k].shape:
                old = int(round((v.shape[1] - 1) ** 0.5))
                v = resample_abs_pos_embed(v, new_size=model.patch_embed.grid_size, old_size=(old, old),
                                           num_prefix_tokens=1, verbose=True)
        elif k == 'patch_embed.proj.weight' and v.ndim < 4:
            v = v.reshape(target[k].shape)
        out[k] = v
    if is_deit:
        kept = [k for k in ('loc_token', 'loc_embed', 'head.weight', 'head.bias') if k in target and k not in out]
        for k in kept:
            out[k] = target[k]
        _logger.info(f'Initialised from a DeiT checkpoint; {", ".join(kept)} keep their random init.')
    check_state_dict(out, model, skip_prefixes=('head.',))
    return out


def _create_sat(variant: str, pretrained: bool = False, **kwargs) -> SATVisionTransformer:
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        SATVisionTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict:
    # the official eval: Resize((256, 256)) (aspect-distorting) -> CenterCrop(224), bilinear == timm's 'squash' mode
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.875, 'crop_mode': 'squash', 'interpolation': 'bilinear', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
        'paper_ids': 'arXiv:2303.10438', 'paper_name': 'Spatial-Aware Token for Weakly Supervised Object Localization',
        'origin_url': 'https://github.com/wpy1999/SAT', **kwargs,
    }


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
