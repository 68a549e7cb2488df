"""RVT with TAP (Token-aware Average Pooling) + ADL, and the plain RVT baselines

Robustifying Token Attention for Vision Transformers (Guo, Stutz, Schiele, ICCV 2023)
    - https://arxiv.org/abs/2303.11126
Towards Robust Vision Transformer (RVT: Mao et al., CVPR 2022) - https://arxiv.org/abs/2105.07926
Official code: https://github.com/guoyongcs/TAPADL (``TAPADL_RVT/tap_robust_models.py``).

RVT: a conv stem (7x7 stride-2 conv, BN, max-pool, 4x4 stride-4 conv; no activation, as the original), pre-norm
blocks with conv-BN MLPs and no position embedding, depthwise stride-2 pooling between stages (the tiny models), global
average pooling, LayerNorm, head. The ``_plus`` models multiply the attention logits of their first ``masked_block``
blocks by ``sigmoid(att_mask)``, a learned (heads, N, N) table. ``tap_rvt_*`` put TAP
(:mod:`vitzoo.layers.token_pooling`) on the attention input of every block (``num_scales=4``); ``rvt_*`` are the same
code with TAP off (``num_scales=0``); they have the TAP-RVT layout (e.g. no position embedding) and have not been
checked against checkpoints of the original RVT repository.

Attention maps for ADL (:mod:`vitzoo.losses.adl`): ``model(x, return_attn=True)`` returns ``(logits, attn)`` with one
post-softmax (B, heads, N, N) map per block. Only then is the attention materialised; otherwise blocks without
``att_mask`` use fused ``scaled_dot_product_attention`` (the multiplicative logit mask needs the explicit path).

Blocks are numbered globally (``blocks.{i}``); official checkpoints (``transformers.{stage}.blocks.{j}``) are renamed
by :func:`checkpoint_filter_fn`, which also resizes ``att_mask`` when the model was built for another resolution.

Beyond the original: any input resolution (at least 16 px), square or not. The original reshapes tokens with
``int(N ** 0.5)`` (square grids only) and slices ``att_mask[:, :N, :N]``, which is only meaningful at 224 and fails
above it; here the mask is bilinearly resized over its query and key grids at run time when the token grid differs
from the construction grid (identical at the construction resolution). The original TAP-RVT entrypoints cannot be
built by timm 1.0 ``create_model`` (they pass ``pretrained_cfg_overlay`` on to the model); these can. Fused attention,
``features_only``, grad checkpointing, ``forward_intermediates``. Written for vitzoo.
"""
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import to_2tuple, trunc_normal_, use_fused_attn
from timm.models import generate_default_cfgs, register_model

from vitzoo.layers.attention import MultiHeadAttention
from vitzoo.layers.sdpa import use_sdpa
from vitzoo.layers.token_pooling import TokenPoolingMixin
from ._builder import build_model_with_cfg
from ._helpers import CheckpointError, finish_tap_state_dict, sizes_match, unwrap_state_dict
from ._manifest import manifest_cfg
from ._base import default_layers
from ._blocks import PreNormBlock
from ._tap import TapTransformer, tap_build_kwargs, tap_cfg

__all__ = ['RVT']


def resize_att_mask(mask: torch.Tensor, old_hw: Tuple[int, int], new_hw: Tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize a (heads, Hq*Wq, Hk*Wk) token-pair table over both its query and its key grid.

    Args:
        mask: The table for the ``old_hw`` grid (query and key grids are the same).
        old_hw: Grid it was made for.
        new_hw: Target grid.
    """
    if sizes_match(old_hw, new_hw):  # no guard on a symbolic size: it takes the (exact at an equal size) resize
        return mask
    h = mask.shape[0]
    (oh, ow), (nh, nw) = old_hw, new_hw
    m = mask.reshape(h * oh * ow, 1, oh, ow)  # key grid as the image
    m = F.interpolate(m, size=(nh, nw), mode='bilinear', align_corners=False)
    m = m.reshape(h, oh * ow, nh * nw).transpose(1, 2).reshape(h * nh * nw, 1, oh, ow)  # query grid as the image
    m = F.interpolate(m, size=(nh, nw), mode='bilinear', align_corners=False)
    return m.reshape(h, nh * nw, nh * nw).transpose(1, 2).contiguous()


class Attention(MultiHeadAttention):
    """RVT self-attention, optionally with the multiplicative logit mask ``sigmoid(att_mask)``."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.,
                 proj_drop: float = 0., use_mask: bool = False, grid_size: Tuple[int, int] = (14, 14)):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
                         fused_attn=use_fused_attn())
        self.use_mask = use_mask
        self.grid_size = tuple(grid_size)
        if use_mask:
            n = self.grid_size[0] * self.grid_size[1]
            self.att_mask = nn.Parameter(torch.zeros(num_heads, n, n))
            trunc_normal_(self.att_mask, std=.02, a=-.02, b=.02)  # the original truncates at one std

    def forward(self, x: torch.Tensor, hw: Tuple[int, int],
                return_attn: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        q, k, v = self._split_qkv(x)
        attn = None
        if self.fused_attn and not return_attn and not self.use_mask and use_sdpa(q, k, v):
            x = self._sdpa(q, k, v)
        else:
            attn = self._logits(q, k)
            if self.use_mask:
                attn = attn * torch.sigmoid(resize_att_mask(self.att_mask, self.grid_size, hw))
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        return self._project(x), attn


class ConvMlp(nn.Module):
    """RVT MLP on the token grid: 1x1 conv-BN, act, depthwise 3x3 conv-BN, act, 1x1 conv-BN."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: Callable = nn.GELU, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.bn1 = nn.BatchNorm2d(hidden_features)
        self.dwconv = nn.Conv2d(hidden_features, hidden_features, 3, padding=1, groups=hidden_features)
        self.bn2 = nn.BatchNorm2d(hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden_features, in_features, 1)
        self.bn3 = nn.BatchNorm2d(in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, hw[0], hw[1])
        x = self.drop(self.act(self.bn1(self.fc1(x))))
        x = self.act(self.bn2(self.dwconv(x)))
        x = self.drop(self.bn3(self.fc2(x)))
        return x.flatten(2).transpose(1, 2)


class Block(TokenPoolingMixin, PreNormBlock):
    """RVT block, with TAP on the attention input when ``num_scales > 0`` (residual on the unpooled tokens).

    A :class:`~vitzoo.models._blocks.PreNormBlock` with the RVT attention and conv MLP, both run on the token grid.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Callable = nn.GELU,
            norm_layer: Callable = nn.LayerNorm,
            use_mask: bool = False,
            grid_size: Tuple[int, int] = (14, 14),
            num_scales: int = 0,
    ):
        super().__init__(
            dim, num_heads, Attention, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop,
            attn_drop=attn_drop, drop_path=drop_path, act_layer=act_layer, norm_layer=norm_layer, mlp_layer=ConvMlp,
            use_mask=use_mask, grid_size=grid_size)
        self.init_token_pooling(dim, num_scales)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int],
                return_attn: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        y, attn = self.attn(self.norm1(self.token_pool(x, hw)), hw, return_attn)
        x = x + self.drop_path1(y)
        x = x + self.drop_path2(self.mlp(self.norm2(x), hw))
        return x, attn


class ConvEmbed(nn.Module):
    """RVT stem: 7x7/2 conv (padding 2), BN, 3x3/2 max-pool, 4x4/4 conv (1x1/1 for patch size 4). Stride 16."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int = 16):
        super().__init__()
        ks = 1 if patch_size == 4 else 4
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, 32, kernel_size=7, stride=2, padding=2),
            nn.BatchNorm2d(32),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(32, embed_dim, kernel_size=ks, stride=ks),
        )
        self.reduction = 4 * ks

    def grid(self, hw: Tuple[int, int]) -> Tuple[int, int]:
        """Token grid of an H x W input (floors of the conv arithmetic)."""
        ks = self.proj[3].kernel_size[0]
        return tuple(((((s - 3) // 2) // 2 + 1) // ks) if s >= 3 else 0 for s in hw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class HeadPooling(nn.Module):
    """Stage transition: depthwise-grouped 3x3 stride-2 conv to the next width (key ``conv``)."""

    def __init__(self, in_dim: int, out_dim: int, stride: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=stride + 1, padding=stride // 2, stride=stride,
                              groups=in_dim)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> Tuple[torch.Tensor, Tuple[int, int]]:
        B, N, C = x.shape
        x = self.conv(x.transpose(1, 2).reshape(B, C, hw[0], hw[1]))
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class RVT(TapTransformer):
    """RVT (the official ``PoolingTransformer``), with TAP in every block when ``num_scales > 0``.

    Args:
        img_size: Construction resolution (sets the ``att_mask`` grid; other resolutions run too).
        patch_size: Stem stride family (16; 4 makes the last stem conv 1x1, as the original).
        in_chans: Input channels.
        num_classes: Classifier classes (0 = no head).
        global_pool: 'avg' (default) or '' (per-token outputs).
        base_dims: Head width per stage (width = base_dim * heads).
        depth: Blocks per stage.
        heads: Heads per stage.
        mlp_ratio: MLP expansion.
        use_mask: Learned ``att_mask`` in the first ``masked_block`` blocks of stage 0 (the ``_plus`` models).
        masked_block: Number of masked blocks.
        num_scales: TAP scales (0 = no TAP; the TAP-RVT models use 4).
        drop_rate: Dropout before the head.
        pos_drop_rate: Dropout after the stem (the original's ``drop_rate`` drives this and the block dropouts).
        proj_drop_rate: Dropout in the blocks.
        attn_drop_rate: Attention dropout.
        drop_path_rate: Stochastic depth, ``rate * i / total_blocks`` for block i (as the original).
        norm_layer: Norm (default LayerNorm eps 1e-6).
        act_layer: Activation.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            base_dims: Sequence[int] = (64,),
            depth: Sequence[int] = (12,),
            heads: Sequence[int] = (12,),
            mlp_ratio: float = 4.,
            use_mask: bool = False,
            masked_block: Optional[int] = None,
            num_scales: int = 0,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Optional[Callable] = None,
            act_layer: Optional[Callable] = None,
            **kwargs,
    ):
        super().__init__(num_classes, global_pool, num_prefix_tokens=0, num_scales=num_scales)
        if not len(base_dims) == len(depth) == len(heads):
            raise ValueError('base_dims, depth and heads need one entry per stage')
        if use_mask and masked_block is None:
            raise ValueError('use_mask needs masked_block')
        norm_layer, act_layer = default_layers(norm_layer, act_layer)
        dims = [b * h for b, h in zip(base_dims, heads)]

        self.patch_embed = ConvEmbed(in_chans, dims[0], patch_size)
        grid = self.patch_embed.grid(to_2tuple(img_size))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        total = sum(depth)
        self.blocks = nn.ModuleList()
        self.pools = nn.ModuleList()
        self.stage_ends: List[int] = []
        self.feature_info = []
        reduction = self.patch_embed.reduction
        for s, (d, h, dim) in enumerate(zip(depth, heads, dims)):
            for j in range(d):
                i = len(self.blocks)
                self.blocks.append(Block(
                    dim, h, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                    drop_path=drop_path_rate * i / total, act_layer=act_layer, norm_layer=norm_layer,
                    use_mask=use_mask and s == 0 and j < masked_block, grid_size=grid, num_scales=num_scales))
                self.feature_info.append(dict(module=f'blocks.{i}', num_chs=dim, reduction=reduction))
            self.stage_ends.append(len(self.blocks) - 1)
            if s < len(depth) - 1:
                self.pools.append(HeadPooling(dim, dims[s + 1]))
                grid = tuple((g - 1) // 2 + 1 for g in grid)
                reduction *= 2
        self.num_features = self.head_hidden_size = self.embed_dim = dims[-1]
        self._init_head(norm_layer(dims[-1]), drop_rate)  # the norm comes after global pooling, as the original
        self.init_weights()

    def init_weights(self) -> None:
        """The official init: only LayerNorms are (re)initialised; Linear / Conv keep the PyTorch defaults."""
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r'^patch_embed', blocks=[(r'^blocks\.(\d+)', None), (r'^pools\.(\d+)', None),
                                                  (r'^norm', (99999,))])

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        H, W = x.shape[-2:]
        if min(self.patch_embed.grid((H, W))) < 1:
            raise ValueError(f'{type(self).__name__}: input size {H}x{W} gives an empty token grid; '
                             f'the RVT stem needs at least 16 px per side')
        x = self.patch_embed(x)
        hw = (x.shape[2], x.shape[3])
        return self.pos_drop(x.flatten(2).transpose(1, 2)), hw

    def _after_block(self, index: int, x: torch.Tensor, hw: Tuple[int, int]) -> Tuple[torch.Tensor, Tuple[int, int]]:
        # stage pooling after a stage's last block (not after the model's last block)
        if index in self.stage_ends and self.stage_ends.index(index) < len(self.pools) and index < len(self.blocks) - 1:
            x, hw = self.pools[self.stage_ends.index(index)](x, hw)
        return x, hw

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks (and stage pools) after the last of ``indices``; returns the kept indices."""
        take_indices = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        max_index = len(self.blocks) - 1
        self.stage_ends = [e for e in self.stage_ends if e < max_index] + [max_index]
        self.pools = self.pools[:len(self.stage_ends) - 1]
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=1)
        x = self.head_drop(self.norm(x))
        return x if pre_logits else self.head(x)


def checkpoint_filter_fn(state_dict: Dict, model: RVT) -> Dict[str, torch.Tensor]:
    """Load an official (TAP-)RVT checkpoint into ``model``.

    Accepts ``{'model': ...}`` / ``{'state_dict': ...}`` / plain dicts, drops DDP ``module.`` prefixes, renames
    ``transformers.{stage}.blocks.{j}.`` to the global ``blocks.{i}.``, resizes ``att_mask`` to the model's grid, fills
    absent BatchNorm ``num_batches_tracked`` counters, then checks every key and shape, raising
    :class:`~vitzoo.models._helpers.CheckpointError` that names the key. BatchNorm running statistics are loaded as
    they are: run the model in ``eval()`` to reproduce the official outputs.
    """
    state_dict = unwrap_state_dict(state_dict)
    target = model.state_dict()
    starts = [0] + [e + 1 for e in model.stage_ends[:-1]]
    out = {}
    for k, v in state_dict.items():
        if k.startswith('transformers.'):
            _, s, rest = k.split('.', 2)
            if not rest.startswith('blocks.') or int(s) >= len(starts):
                raise CheckpointError(f"unexpected key '{k}' (shape {tuple(v.shape)})")
            _, j, rest = rest.split('.', 2)
            k = f'blocks.{starts[int(s)] + int(j)}.{rest}'
        if k.endswith('.attn.att_mask') and k in target and v.shape != target[k].shape and v.shape[0] == \
                target[k].shape[0]:
            old = int(round(v.shape[-1] ** 0.5))
            if old * old != v.shape[-1]:
                raise CheckpointError(f"key '{k}': att_mask of shape {tuple(v.shape)} is not a square grid")
            v = resize_att_mask(v, (old, old), model.blocks[int(k.split('.')[1])].attn.grid_size)
        out[k] = v
    return finish_tap_state_dict(out, model, target, 'rvt')


def _create_rvt(variant: str, pretrained: bool = False, **kwargs) -> RVT:
    return build_model_with_cfg(RVT, variant, pretrained, **tap_build_kwargs(checkpoint_filter_fn, **kwargs))


# official eval (TAPADL_RVT/datasets.py build_transform): Resize(int(256 / 224 * 224), bicubic) (shorter side) ->
# CenterCrop(224), i.e. timm's 'center' mode at crop_pct 0.875
_cfg = partial(tap_cfg, crop_pct=0.875, first_conv='patch_embed.proj.0')


default_cfgs = generate_default_cfgs({
    **{f'tap_rvt_{s}.in1k': _cfg(**manifest_cfg(f'tap_rvt_{s}.in1k'))
       for s in ('tiny', 'tiny_plus', 'small', 'small_plus', 'base', 'base_plus')},
    **{f'rvt_{s}.in1k': _cfg(paper_ids='arXiv:2105.07926',
                             origin_url='https://github.com/vtddggg/Robust-Vision-Transformer')
       for s in ('tiny', 'tiny_plus', 'small', 'small_plus', 'base', 'base_plus')},
})

_ARGS = {
    'tiny': dict(base_dims=[32, 32], depth=[10, 2], heads=[6, 12]),
    'tiny_plus': dict(base_dims=[32, 32], depth=[10, 2], heads=[6, 12], use_mask=True, masked_block=10),
    'small': dict(base_dims=[64], depth=[12], heads=[6]),
    'small_plus': dict(base_dims=[64], depth=[12], heads=[6], use_mask=True, masked_block=5),
    'base': dict(base_dims=[64], depth=[12], heads=[12]),
    'base_plus': dict(base_dims=[64], depth=[12], heads=[12], use_mask=True, masked_block=5),
}


def _rvt(size: str, tap: bool, pretrained: bool, kwargs: Dict) -> RVT:
    variant = f"{'tap_' if tap else ''}rvt_{size}"
    model_args = dict(img_size=224, patch_size=16, mlp_ratio=4, num_scales=4 if tap else 0, **_ARGS[size])
    return _create_rvt(variant, pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def tap_rvt_tiny(pretrained: bool = False, **kwargs) -> RVT:
    """TAP-RVT-Ti @ 224: 10 blocks of 192 + 2 of 384. 8.7M params, 1.3 GFLOPs (measured)."""
    return _rvt('tiny', True, pretrained, kwargs)


@register_model
def tap_rvt_tiny_plus(pretrained: bool = False, **kwargs) -> RVT:
    """TAP-RVT-Ti* @ 224: as tap_rvt_tiny, with att_mask in blocks 0-9. 11.1M params, 1.3 GFLOPs (measured)."""
    return _rvt('tiny_plus', True, pretrained, kwargs)


@register_model
def tap_rvt_small(pretrained: bool = False, **kwargs) -> RVT:
    """TAP-RVT-S @ 224: 12 blocks of 384. 22.3M params, 4.7 GFLOPs (measured)."""
    return _rvt('small', True, pretrained, kwargs)


@register_model
def tap_rvt_small_plus(pretrained: bool = False, **kwargs) -> RVT:
    """TAP-RVT-S* @ 224: with att_mask in blocks 0-4. 23.5M params, 4.7 GFLOPs (measured)."""
    return _rvt('small_plus', True, pretrained, kwargs)


@register_model
def tap_rvt_base(pretrained: bool = False, **kwargs) -> RVT:
    """TAP-RVT-B @ 224: 12 blocks of 768. 87.1M params, 17.7 GFLOPs (measured)."""
    return _rvt('base', True, pretrained, kwargs)


@register_model
def tap_rvt_base_plus(pretrained: bool = False, **kwargs) -> RVT:
    """TAP-RVT-B* @ 224 (released, TAP + ADL): 12 blocks of 768, att_mask in blocks 0-4.

    89.40M params as the released code builds it (the README's 92.1M does not match the code), 17.7 GFLOPs
    (measured); 83.1% IN-1k top-1, 44.7 IN-C mCE, 32.7 IN-A (README).
    """
    return _rvt('base_plus', True, pretrained, kwargs)


@register_model
def rvt_tiny(pretrained: bool = False, **kwargs) -> RVT:
    """RVT-Ti @ 224 (no TAP). 8.7M params, 1.3 GFLOPs (measured)."""
    return _rvt('tiny', False, pretrained, kwargs)


@register_model
def rvt_tiny_plus(pretrained: bool = False, **kwargs) -> RVT:
    """RVT-Ti* @ 224 (no TAP, att_mask in blocks 0-9). 10.9M params, 1.3 GFLOPs (measured)."""
    return _rvt('tiny_plus', False, pretrained, kwargs)


@register_model
def rvt_small(pretrained: bool = False, **kwargs) -> RVT:
    """RVT-S @ 224 (no TAP). 22.1M params, 4.7 GFLOPs (measured)."""
    return _rvt('small', False, pretrained, kwargs)


@register_model
def rvt_small_plus(pretrained: bool = False, **kwargs) -> RVT:
    """RVT-S* @ 224 (no TAP, att_mask in blocks 0-4). 23.3M params, 4.7 GFLOPs (measured)."""
    return _rvt('small_plus', False, pretrained, kwargs)


@register_model
def rvt_base(pretrained: bool = False, **kwargs) -> RVT:
    """RVT-B @ 224 (no TAP). 86.8M params, 17.6 GFLOPs (measured)."""
    return _rvt('base', False, pretrained, kwargs)


@register_model
def rvt_base_plus(pretrained: bool = False, **kwargs) -> RVT:
    """RVT-B* @ 224 (no TAP, att_mask in blocks 0-4). 89.1M params, 17.6 GFLOPs (measured)."""
    return _rvt('base_plus', False, pretrained, kwargs)
