"""FAN with TAP (Token-aware Average Pooling) + ADL, and the plain FAN baselines

Robustifying Token Attention for Vision Transformers (Guo, Stutz, Schiele, ICCV 2023)
    - https://arxiv.org/abs/2303.11126
Understanding The Robustness in Vision Transformers (FAN: Zhou et al., ICML 2022) - https://arxiv.org/abs/2204.12451
Official code: https://github.com/guoyongcs/TAPADL (``TAPADL_FAN/models/{tap_fan,convnext_utils}.py``).

FAN blocks: token-mixing self-attention followed by "channel processing" (a channel attention whose values go through
a depthwise-conv MLP), layer scale, then two class-attention blocks on a class token, a final norm and the head. The
hybrids use a 2-stage ConvNeXt stem and a 2x2 patch projection (stride 16 in total). ``tap_fan_*`` models put TAP
(:mod:`vitzoo.layers.token_pooling`) on the input of every token-mixing attention (``num_scales=4``); ``fan_*`` are the
same code with TAP off (``num_scales=0``, no ``dilation_predictor`` keys; not checked against the original FAN
repository's checkpoints). Parameter names follow the official TAP-FAN checkpoints, so they load unchanged through
:func:`checkpoint_filter_fn`.

Attention maps for ADL (:mod:`vitzoo.losses.adl`): ``model(x, return_attn=True)`` returns ``(logits, attn)`` with one
post-softmax (B, heads, N, N) map per FAN block (class-attention blocks excluded); inside
``with model.record_attention():`` any forward keeps them for ``model.pop_attention()`` (the TAP-FAN segmentation
backbone's switch). Only then is the attention materialised; otherwise the blocks use fused
``scaled_dot_product_attention``.

Beyond the original: any input resolution that is a multiple of 16, square or not (the position encoding is computed
for the actual grid; the original TAP reshape assumes a square grid), fused attention, ``features_only``, grad
checkpointing, timm's ``forward_intermediates``. The channel processing's ``attn * v`` is computed as a broadcast
product (the original materialises a (B, heads, d, N) tensor and permutes it: same numbers).

Kept on purpose (faithfulness): drop path is constant over the blocks; there is no activation between the MLP's fc1
and fc2; the ConvNeXt norms after the stem normalise with the unbiased variance, as the original computes them
(:class:`LayerNorm2dUnbiased`; the official reference outputs need it).

Not registered: the official ``tap_fan_small_12_p16_224_se_attn`` cannot run (its SE blocks do not take the
attention-list input) and has no TAP, and ``tap_fan_swin_*`` have no TAP; the plain ``fan_small_12_p16_224_se_attn``
is registered. ``tap_fan_Xlarge_16_p4_hybrid`` is registered lower-case (``tap_fan_xlarge_16_p4_hybrid``).
Written for vitzoo.
"""
import math
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import LayerNorm2d, trunc_normal_, use_fused_attn
from timm.models import checkpoint, generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXtStage
from timm.models.xcit import ClassAttentionBlock, PositionalEncodingFourier

from vitzoo.layers.attention import MultiHeadAttention
from vitzoo.layers.sdpa import use_sdpa
from vitzoo.layers.token_pooling import TokenPoolingMixin
from vitzoo.layers.linear import Linear
from ._builder import build_model_with_cfg
from ._helpers import finish_tap_state_dict, init_weights_trunc_normal, unwrap_state_dict
from ._manifest import manifest_cfg
from ._base import default_layers
from ._blocks import PreNormBlock
from ._tap import TapTransformer, tap_build_kwargs, tap_cfg

__all__ = ['FAN']


class TokenMixing(MultiHeadAttention):
    """FAN self-attention (separate ``q`` and ``kv`` projections); returns the attention map on request."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.,
                 proj_drop: float = 0.):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
                         fused_attn=use_fused_attn(), separate_q=True)

    def forward(self, x: torch.Tensor, return_attn: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        q = self._split_q(x)
        k, v = self._split_kv(x)
        attn = None
        if self.fused_attn and not return_attn and use_sdpa(q, k, v):
            x = self._sdpa(q, k, v)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # scale before the product, as FAN
            attn = self.attn_drop(attn)
            x = attn @ v
        return self._project(x), attn


class DWConv(nn.Module):
    """Depthwise 3x3 conv -> act -> BN -> depthwise 3x3 conv on a token grid (keys ``conv1``, ``bn``, ``conv2``)."""

    def __init__(self, dim: int, act_layer: Callable = nn.GELU):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.act = act_layer()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, hw[0], hw[1])
        x = self.conv2(self.bn(self.act(self.conv1(x))))
        return x.flatten(2).transpose(1, 2)


class DWConvMlp(nn.Module):
    """FAN MLP: fc1 -> (x + gamma * DWConv(x)) -> fc2. As in the original, no activation between fc1 and fc2."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: Callable = nn.GELU, drop: float = 0.):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features, act_layer)
        self.gamma = nn.Parameter(torch.ones(hidden_features))
        self.fc2 = Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        x = self.fc1(x)
        x = self.drop(self.gamma * self.dwconv(x, hw)) + x
        return self.drop(self.fc2(x))


class SqueezeExcite(nn.Module):
    """SE of the FAN ``_se_attn`` blocks (keys ``conv_reduce``, ``conv_expand``)."""

    def __init__(self, dim: int, se_ratio: float = 0.25):
        super().__init__()
        reduced = max(1, int(dim * se_ratio + 0.5))
        self.conv_reduce = nn.Conv2d(dim, reduced, 1)
        self.act = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(reduced, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.conv_expand(self.act(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * s.sigmoid()


class SEMlp(DWConvMlp):
    """FAN MLP followed by squeeze-excitation over the token grid (``fan_small_12_p16_224_se_attn``)."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: Callable = nn.GELU, drop: float = 0.):
        super().__init__(in_features, hidden_features, act_layer, drop)
        self.se = SqueezeExcite(in_features)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        x = super().forward(x, hw)
        B, N, C = x.shape
        x = self.se(x.transpose(1, 2).reshape(B, C, hw[0], hw[1]))
        return x.flatten(2).transpose(1, 2)


class ChannelProcessing(nn.Module):
    """FAN channel attention: sigmoid(softmax_N(q)^T . mean_d softmax_N(k)) * temperature, times the MLP'd values."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.,
                 mlp_hidden_dim: Optional[int] = None, act_layer: Callable = nn.GELU, drop: float = 0.,
                 norm_layer: Callable = nn.LayerNorm):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} must be divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.mlp_v = DWConvMlp(dim, mlp_hidden_dim or dim, act_layer=act_layer, drop=drop)
        self.norm_v = norm_layer(dim)
        self.q = Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).transpose(1, 2)  # B, h, N, d
        k = x.reshape(B, N, h, C // h).transpose(1, 2)
        k = k.softmax(dim=-2).mean(dim=-1, keepdim=True)  # B, h, N, 1
        attn = torch.sigmoid(q.softmax(dim=-2).transpose(-1, -2) @ k) * self.temperature  # B, h, d, 1
        attn = self.attn_drop(attn)
        v = self.norm_v(self.mlp_v(x, hw))  # the values are the input tokens themselves
        return v * attn.reshape(B, 1, C)


class OverlapPatchEmbed(nn.Module):
    """3x3 stride-2 conv + LayerNorm between FAN stages of different width (only the X-large hybrid has one)."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(embed_dim)  # eps 1e-5, as the original

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        x = self.proj(x.transpose(1, 2).reshape(B, C, hw[0], hw[1]))
        return self.norm(x.flatten(2).transpose(1, 2))


class FANBlock(TokenPoolingMixin, PreNormBlock):
    """FAN block (token mixing + channel processing), with TAP on the attention input when ``num_scales > 0``.

    A :class:`~vitzoo.models._blocks.PreNormBlock` whose MLP is the channel processing (or the SE-MLP), with layer
    scales ``gamma1`` / ``gamma2`` on both branches and an optional downsample after them.

    TAP (original ``TAPFANBlock``): the scale weights are predicted from the raw tokens, the attention reads
    ``norm1(TAP(x))`` and the residual adds to the unpooled ``x``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Callable = nn.GELU,
            norm_layer: Callable = nn.LayerNorm,
            eta: float = 1.,
            num_scales: int = 0,
            se_mlp: bool = False,
            out_dim: Optional[int] = None,
    ):
        def channel_processing(d: int, hidden: int, act_layer: Callable, drop: float) -> ChannelProcessing:
            # the channel-processing "MLP" also has heads, a qkv bias, attention dropout and a norm of its own
            return ChannelProcessing(d, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                     mlp_hidden_dim=hidden, act_layer=act_layer, drop=drop, norm_layer=norm_layer)

        super().__init__(
            dim, num_heads, TokenMixing, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop,
            attn_drop=attn_drop, drop_path=drop_path, act_layer=act_layer, norm_layer=norm_layer,
            mlp_layer=SEMlp if se_mlp else channel_processing)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))
        self.downsample = OverlapPatchEmbed(dim, out_dim) if out_dim is not None and out_dim != dim else None
        self.init_token_pooling(dim, num_scales)

    def forward(
            self,
            x: torch.Tensor,
            hw: Tuple[int, int],
            return_attn: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        y, attn = self.attn(self.norm1(self.token_pool(x, hw)), return_attn)
        x = x + self.drop_path1(self.gamma1 * y)
        x = x + self.drop_path2(self.gamma2 * self.mlp(self.norm2(x), hw))
        if self.downsample is not None:
            x = self.downsample(x, hw)
        return x, attn


class LayerNorm2dUnbiased(nn.LayerNorm):
    """Channel LayerNorm of (B, C, H, W) maps that normalises with the *unbiased* variance (divides by C - 1).

    Reproduces the original hybrid stem: its ``LayerNorm2d`` takes a ``torch.var_mean`` path (unbiased by default) for
    non-contiguous inputs, and every norm after the stem's sees channels-last (non-contiguous) maps, because the stem
    norm returns a permuted view whose layout the following convolutions keep. The official reference outputs match
    only with it (max logit error 6e-3 with a biased variance). Computed as a standard layer norm with eps * (C-1)/C,
    scaled by sqrt((C-1)/C).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, **kwargs):
        super().__init__(num_channels, eps=eps, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        f = (c - 1) / c
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight * math.sqrt(f), self.bias,
                         self.eps * f)
        return x.permute(0, 3, 1, 2)


class ConvNeXtHybridBackbone(nn.Module):
    """The first ConvNeXt stages of the FAN hybrids (stride 8): patchify stem + ``len(depths)`` stages.

    The stem norm is a standard channel LayerNorm; the norms in the stages use :class:`LayerNorm2dUnbiased`, as the
    original computes them.
    """

    def __init__(self, in_chans: int = 3, depths: Sequence[int] = (3, 3), dims: Sequence[int] = (128, 256),
                 ls_init_value: float = 1e-6):
        super().__init__()
        norm2d = partial(LayerNorm2d, eps=1e-6)
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), norm2d(dims[0]))
        stages, prev = [], dims[0]
        for i, d in enumerate(depths):
            stages.append(ConvNeXtStage(
                prev, dims[i], stride=2 if i > 0 else 1, depth=d, ls_init_value=ls_init_value, conv_mlp=True,
                norm_layer=partial(LayerNorm2dUnbiased, eps=1e-6), norm_layer_cl=partial(nn.LayerNorm, eps=1e-6)))
            prev = dims[i]
        self.stages = nn.Sequential(*stages)
        self.num_features = prev
        self.reduction = 4 * 2 ** (len(depths) - 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # the original ConvNeXt init
                trunc_normal_(m.weight, std=.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


class ConvPatchEmbed(nn.Module):
    """FAN-ViT stem: conv3x3(stride 2)+BN blocks with GELU between them (keys ``proj.{0,2,4,6}.{0,1}``)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768, act_layer: Callable = nn.GELU):
        super().__init__()
        widths = {16: [embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim],
                  8: [embed_dim // 4, embed_dim // 2, embed_dim],
                  4: [embed_dim // 4, embed_dim]}.get(patch_size)
        if widths is None:
            raise ValueError(f'ConvPatchEmbed: patch_size must be 4, 8 or 16, got {patch_size}')
        layers, prev = [], in_chans
        for i, w in enumerate(widths):
            if i:
                layers.append(act_layer())
            layers.append(nn.Sequential(nn.Conv2d(prev, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w)))
            prev = w
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class HybridEmbed(nn.Module):
    """ConvNeXt stages followed by a ``patch_size`` x ``patch_size`` projection to the token width."""

    def __init__(self, backbone: ConvNeXtHybridBackbone, patch_size: int = 2, embed_dim: int = 384):
        super().__init__()
        self.backbone = backbone
        self.proj = nn.Conv2d(backbone.num_features, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor, stage_maps: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """Tokens as a (B, C, h, w) map; the ConvNeXt stage maps are appended to ``stage_maps`` if given."""
        if stage_maps is None:
            return self.proj(self.backbone(x))
        x = self.backbone.stem(x)
        for stage in self.backbone.stages:
            x = stage(x)
            stage_maps.append(x)
        return self.proj(x)


class FAN(TapTransformer):
    """FAN (ViT-style conv stem or ConvNeXt hybrid), with TAP in every FAN block when ``num_scales > 0``.

    Args:
        img_size: Nominal resolution (nothing is tied to it; any multiple of ``patch_size`` runs).
        patch_size: Total stride of the stem (16).
        in_chans: Input channels.
        num_classes: Classifier classes (0 = no head).
        global_pool: 'token' (class token, default), 'avg' (mean of patch tokens) or ''.
        embed_dim: Width of the first FAN block.
        depth: FAN blocks.
        num_heads: Heads, an int or one per block.
        channel_dims: Width per block (default ``embed_dim`` everywhere); a change inserts a stride-2 downsample.
        mlp_ratio: MLP expansion.
        qkv_bias: Bias in q / kv / channel q.
        backbone_depths: ConvNeXt stage depths of the hybrid stem (None = ViT conv stem).
        backbone_dims: ConvNeXt widths (the official lists have 4 entries; the first ``len(backbone_depths)`` are used).
        hybrid_patch_size: Stride of the hybrid projection.
        se_mlp: SE-MLP blocks instead of channel processing (``_se_attn``).
        cls_attn_layers: Class-attention blocks.
        use_pos_embed: Add the Fourier position encoding.
        eta: Layer-scale init.
        tokens_norm: Class-attention blocks normalise all tokens (True in every FAN model).
        head_init_scale: Multiplier of the head's initial weights.
        num_scales: TAP scales (0 = no TAP; the TAP-FAN models use 4).
        drop_rate: Dropout before the head.
        pos_drop_rate: Dropout after the position encoding.
        proj_drop_rate: Dropout in the blocks (the original's ``drop_rate``).
        attn_drop_rate: Attention dropout.
        drop_path_rate: Stochastic depth, the same for every block (as the original).
        norm_layer: Norm (default LayerNorm eps 1e-6).
        act_layer: Activation.
    """

    global_pools = ('token', 'avg', '')

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: Union[int, Sequence[int]] = 12,
            channel_dims: Optional[Sequence[int]] = None,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            backbone_depths: Optional[Sequence[int]] = None,
            backbone_dims: Sequence[int] = (128, 256, 512, 1024),
            hybrid_patch_size: int = 2,
            se_mlp: bool = False,
            cls_attn_layers: int = 2,
            use_pos_embed: bool = True,
            eta: float = 1.,
            tokens_norm: bool = False,
            head_init_scale: float = 1.,
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
        super().__init__(num_classes, global_pool, num_prefix_tokens=1, num_scales=num_scales)
        norm_layer, act_layer = default_layers(norm_layer, act_layer)
        num_heads = [num_heads] * depth if isinstance(num_heads, int) else list(num_heads)
        channel_dims = [embed_dim] * depth if channel_dims is None else list(channel_dims)
        if len(num_heads) != depth or len(channel_dims) != depth:
            raise ValueError(f'num_heads and channel_dims need {depth} entries')
        self.patch_size = patch_size

        if backbone_depths is not None:
            backbone = ConvNeXtHybridBackbone(in_chans, backbone_depths, backbone_dims[:len(backbone_depths)])
            if backbone.reduction * hybrid_patch_size != patch_size:
                raise ValueError(f'hybrid stem stride {backbone.reduction * hybrid_patch_size} != patch_size '
                                 f'{patch_size}')
            self.patch_embed = HybridEmbed(backbone, patch_size=hybrid_patch_size, embed_dim=embed_dim)
        else:
            self.patch_embed = ConvPatchEmbed(patch_size, in_chans, embed_dim, act_layer=act_layer)
        self.pos_embed = PositionalEncodingFourier(dim=embed_dim) if use_pos_embed else None
        self.pos_drop = nn.Dropout(pos_drop_rate)

        self.blocks = nn.ModuleList()
        self.feature_info = []
        reduction = patch_size
        for i in range(depth):
            out_dim = channel_dims[i + 1] if i + 1 < depth else channel_dims[i]
            self.blocks.append(FANBlock(
                channel_dims[i], num_heads[i], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate, drop_path=drop_path_rate, act_layer=act_layer, norm_layer=norm_layer,
                eta=eta, num_scales=num_scales, se_mlp=se_mlp, out_dim=out_dim))
            if out_dim != channel_dims[i]:
                reduction *= 2
            self.feature_info.append(dict(module=f'blocks.{i}', num_chs=out_dim, reduction=reduction))
        self.num_features = self.head_hidden_size = self.embed_dim = channel_dims[-1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.num_features))
        self.cls_attn_blocks = nn.ModuleList([
            ClassAttentionBlock(
                self.num_features, num_heads[-1], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate, act_layer=act_layer, norm_layer=norm_layer, eta=eta, tokens_norm=tokens_norm)
            for _ in range(cls_attn_layers)])
        self._init_head(norm_layer(self.num_features), drop_rate)
        self.init_weights(head_init_scale)

    def init_weights(self, head_init_scale: float = 1.) -> None:
        """The official init: trunc_normal(.02) Linear / class token, unit LayerNorms, He-normal MLP convs."""
        trunc_normal_(self.cls_token, std=.02)
        for name, m in self.named_modules():
            init_weights_trunc_normal(m)
            if isinstance(m, nn.Conv2d) and '.mlp' in name and '.dwconv.' in name:
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if isinstance(self.head, nn.Linear):
            self.head.weight.data.mul_(head_init_scale)
            self.head.bias.data.mul_(head_init_scale)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r'^cls_token|pos_embed|patch_embed',
            blocks=[(r'^blocks\.(\d+)', None), (r'^cls_attn_blocks\.(\d+)', (99999,)), (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        for m in self.patch_embed.modules():
            if isinstance(m, ConvNeXtStage):
                m.grad_checkpointing = enable

    def _embed(self, x: torch.Tensor,
               stem_maps: Optional[List[torch.Tensor]] = None) -> Tuple[torch.Tensor, Tuple[int, int]]:
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f'{type(self).__name__}: input size {H}x{W} is not a multiple of the patch size {p}')
        if stem_maps is not None:
            if not isinstance(self.patch_embed, HybridEmbed):
                raise ValueError(f'{type(self).__name__}: stem maps need a hybrid (ConvNeXt stem) FAN')
            x = self.patch_embed(x, stem_maps)
        else:
            x = self.patch_embed(x)
        B, C, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        if self.pos_embed is not None:
            x = x + self.pos_embed(B, h, w).flatten(2).transpose(1, 2)
        return self.pos_drop(x), (h, w)

    def _block_grid(self, blk: FANBlock, hw: Tuple[int, int]) -> Tuple[int, int]:
        return ((hw[0] + 1) // 2, (hw[1] + 1) // 2) if blk.downsample is not None else hw

    def _cls_attn(self, x: torch.Tensor) -> torch.Tensor:
        """The class token prepended to the patch tokens, through the class-attention blocks (no final norm)."""
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.cls_attn_blocks:
            x = checkpoint(blk, x) if self.grad_checkpointing and not torch.jit.is_scripting() else blk(x)
        return x

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self._cls_attn(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            stem: bool = False,
            cls_attn: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features of selected FAN blocks as (B, C, h, w) maps (or (B, N, C) tokens with ``output_fmt='NLC'``).

        The dense (segmentation) outputs of the official TAP-FAN backbone come from ``stem`` (maps at strides 4 and
        8), ``indices`` (a block's map) and ``cls_attn``; ``with model.record_attention():`` also keeps every run
        block's attention map (see :class:`~vitzoo.models._tap.TapTransformer`).

        Args:
            x: Input images.
            indices: Take the last n blocks if an int, these blocks if a list, all if None.
            norm: Apply the final norm to each intermediate of the final width.
            stop_early: Stop after the last selected block (not with ``cls_attn``, which needs every block).
            output_fmt: 'NCHW' or 'NLC'.
            intermediates_only: Return only the intermediates.
            stem: Put the hybrid stem's ConvNeXt stage maps (always (B, C, H, W)) first in the intermediates.
            cls_attn: Append the patch tokens after the class-attention blocks (class token prepended to the last
                block's tokens, then removed), before the final norm unless ``norm``, at the last block's grid.
        """
        take_indices, last = self._take_indices(indices, stop_early and not cls_attn, output_fmt)
        intermediates: List[torch.Tensor] = []
        x, hw = self._embed(x, intermediates if stem else None)
        x, hw, taken, _ = self._run_blocks(x, hw, take_indices=take_indices, last=last)
        intermediates += [self._format(y, grid, norm, output_fmt) for y, grid in taken]
        if cls_attn:
            t = self._cls_attn(x)
            intermediates.append(self._format(t[:, self.num_prefix_tokens:], hw, norm, output_fmt))
        if intermediates_only:
            return intermediates
        return (self.norm(t) if cls_attn else self._final(x)), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks after the last of ``indices`` (and the class-attention head); returns the kept indices."""
        take_indices = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        if prune_head:
            self.cls_attn_blocks = nn.ModuleList()
        return take_indices


def checkpoint_filter_fn(state_dict: Dict, model: FAN) -> Dict[str, torch.Tensor]:
    """Load an official (TAP-)FAN checkpoint into ``model``.

    Accepts ``{'state_dict': ...}`` / ``{'state_dict_ema': ...}`` / ``{'model': ...}`` / plain dicts, drops DDP
    ``module.`` prefixes, renames ``pos_embeder.`` and splits a fused class-attention ``qkv`` (as the official filter
    does), fills absent BatchNorm ``num_batches_tracked`` counters, then checks every key and shape, raising
    :class:`~vitzoo.models._helpers.CheckpointError` that names the key. BatchNorm running statistics are loaded as
    they are: run the model in ``eval()`` to reproduce the official outputs.
    """
    state_dict = unwrap_state_dict(state_dict)
    target = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        k = k.replace('pos_embeder.', 'pos_embed.')
        if k.endswith('.attn.qkv.weight') and k.startswith('cls_attn_blocks.'):
            pre = k[:-len('qkv.weight')]
            for name, t in zip('qkv', v.reshape(3, -1, v.shape[-1]).unbind(0)):
                out[f'{pre}{name}.weight'] = t
            continue
        if k.endswith('.attn.qkv.bias') and k.startswith('cls_attn_blocks.'):
            pre = k[:-len('qkv.bias')]
            for name, t in zip('qkv', v.reshape(3, -1).unbind(0)):
                out[f'{pre}{name}.bias'] = t
            continue
        out[k] = v
    return finish_tap_state_dict(out, model, target, 'fan')


def _create_fan(variant: str, pretrained: bool = False, **kwargs) -> FAN:
    return build_model_with_cfg(FAN, variant, pretrained, **tap_build_kwargs(checkpoint_filter_fn, **kwargs))


# official eval (TAPADL_FAN/validate_ood.py): timm's loader with the TAPADL_FAN/models/fan.py _cfg, crop_pct 1.0
# bicubic: Resize(224) (shorter side) -> CenterCrop(224)
_cfg = partial(tap_cfg, crop_pct=1.0, first_conv='patch_embed.proj.0.0')


_HYBRID = dict(first_conv='patch_embed.backbone.stem.0')
default_cfgs = generate_default_cfgs({
    'tap_fan_tiny_12_p16_224.in1k': _cfg(),
    'tap_fan_small_12_p16_224.in1k': _cfg(),
    'tap_fan_base_18_p16_224.in1k': _cfg(),
    'tap_fan_large_24_p16_224.in1k': _cfg(),
    'tap_fan_tiny_8_p4_hybrid.in1k': _cfg(**_HYBRID),
    'tap_fan_small_12_p4_hybrid.in1k': _cfg(**_HYBRID),
    'tap_fan_base_16_p4_hybrid.in1k': _cfg(**_HYBRID, **manifest_cfg('tap_fan_base_16_p4_hybrid.in1k')),
    'tap_fan_large_16_p4_hybrid.in1k': _cfg(**_HYBRID),
    'tap_fan_xlarge_16_p4_hybrid.in1k': _cfg(**_HYBRID),
    'fan_tiny_12_p16_224.in1k': _cfg(paper_ids='arXiv:2204.12451'),
    'fan_small_12_p16_224.in1k': _cfg(paper_ids='arXiv:2204.12451'),
    'fan_small_12_p16_224_se_attn.in1k': _cfg(paper_ids='arXiv:2204.12451'),
    'fan_base_18_p16_224.in1k': _cfg(paper_ids='arXiv:2204.12451'),
    'fan_large_24_p16_224.in1k': _cfg(paper_ids='arXiv:2204.12451'),
    'fan_tiny_8_p4_hybrid.in1k': _cfg(paper_ids='arXiv:2204.12451', **_HYBRID),
    'fan_small_12_p4_hybrid.in1k': _cfg(paper_ids='arXiv:2204.12451', **_HYBRID),
    'fan_base_16_p4_hybrid.in1k': _cfg(paper_ids='arXiv:2204.12451', **_HYBRID),
    'fan_large_16_p4_hybrid.in1k': _cfg(paper_ids='arXiv:2204.12451', **_HYBRID),
    'fan_xlarge_16_p4_hybrid.in1k': _cfg(paper_ids='arXiv:2204.12451', **_HYBRID),
})

_TAP = dict(num_scales=4)
_VIT = dict(patch_size=16, eta=1.0, tokens_norm=True)
_HYB = dict(patch_size=16, eta=1.0, tokens_norm=True, backbone_dims=(128, 256, 512, 1024))
_ARGS = {
    'tiny_12_p16_224': dict(embed_dim=192, depth=12, num_heads=4, **_VIT),
    'small_12_p16_224': dict(embed_dim=384, depth=12, num_heads=8, **_VIT),
    'small_12_p16_224_se_attn': dict(embed_dim=384, depth=12, num_heads=8, se_mlp=True, **_VIT),
    'base_18_p16_224': dict(embed_dim=448, depth=18, num_heads=8, **_VIT),
    'large_24_p16_224': dict(embed_dim=480, depth=24, num_heads=10, **_VIT),
    'tiny_8_p4_hybrid': dict(embed_dim=192, depth=8, num_heads=8, backbone_depths=(3, 3), **_HYB),
    # the official "small_12" hybrid has 10 blocks
    'small_12_p4_hybrid': dict(embed_dim=384, depth=10, num_heads=8, backbone_depths=(3, 3), **_HYB),
    'base_16_p4_hybrid': dict(embed_dim=448, depth=16, num_heads=8, backbone_depths=(3, 3), **_HYB),
    # the official "large_16" hybrid has 22 blocks
    'large_16_p4_hybrid': dict(
        embed_dim=480, depth=22, num_heads=10, backbone_depths=(3, 5), head_init_scale=0.001, **_HYB),
    # 20 blocks of 528 (11 heads), a stride-2 downsample, 3 blocks of 768 (16 heads)
    'xlarge_16_p4_hybrid': dict(
        embed_dim=528, depth=23, num_heads=[11] * 20 + [16] * 3, channel_dims=[528] * 20 + [768] * 3,
        backbone_depths=(3, 7), **_HYB),
}


def _fan(size: str, tap: bool, pretrained: bool, kwargs: Dict) -> FAN:
    variant = f"{'tap_' if tap else ''}fan_{size}"
    model_args = dict(_ARGS[size], **(_TAP if tap else {}))
    return _create_fan(variant, pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def tap_fan_tiny_12_p16_224(pretrained: bool = False, **kwargs) -> FAN:
    """TAP-FAN-T-ViT @ 224: 12 blocks, dim 192, TAP in every block. 7.4M params, 1.5 GFLOPs (measured)."""
    return _fan('tiny_12_p16_224', True, pretrained, kwargs)


@register_model
def tap_fan_small_12_p16_224(pretrained: bool = False, **kwargs) -> FAN:
    """TAP-FAN-S-ViT @ 224: 12 blocks, dim 384. 28.5M params, 5.5 GFLOPs (measured)."""
    return _fan('small_12_p16_224', True, pretrained, kwargs)


@register_model
def tap_fan_base_18_p16_224(pretrained: bool = False, **kwargs) -> FAN:
    """TAP-FAN-B-ViT @ 224: 18 blocks, dim 448. 54.6M params, 10.8 GFLOPs (measured)."""
    return _fan('base_18_p16_224', True, pretrained, kwargs)


@register_model
def tap_fan_large_24_p16_224(pretrained: bool = False, **kwargs) -> FAN:
    """TAP-FAN-L-ViT @ 224: 24 blocks, dim 480. 81.0M params, 16.1 GFLOPs (measured)."""
    return _fan('large_24_p16_224', True, pretrained, kwargs)


@register_model
def tap_fan_tiny_8_p4_hybrid(pretrained: bool = False, **kwargs) -> FAN:
    """TAP-FAN-T-Hybrid @ 224: ConvNeXt stem + 8 blocks, dim 192. 7.5M params, 3.7 GFLOPs (measured)."""
    return _fan('tiny_8_p4_hybrid', True, pretrained, kwargs)


@register_model
def tap_fan_small_12_p4_hybrid(pretrained: bool = False, **kwargs) -> FAN:
    """TAP-FAN-S-Hybrid @ 224: ConvNeXt stem + 10 blocks, dim 384. 26.3M params, 7.0 GFLOPs (measured)."""
    return _fan('small_12_p4_hybrid', True, pretrained, kwargs)


@register_model
def tap_fan_base_16_p4_hybrid(pretrained: bool = False, **kwargs) -> FAN:
    """TAP-FAN-B-Hybrid @ 224 (released, TAP + ADL): ConvNeXt stem + 16 blocks, dim 448, 8 heads.

    50.7M params, 11.9 GFLOPs (measured); 84.3% IN-1k top-1, 43.7 IN-C mCE, 42.3 IN-A (README).
    """
    return _fan('base_16_p4_hybrid', True, pretrained, kwargs)


@register_model
def tap_fan_large_16_p4_hybrid(pretrained: bool = False, **kwargs) -> FAN:
    """TAP-FAN-L-Hybrid @ 224: ConvNeXt stem (3, 5) + 22 blocks, dim 480. 77.2M params, 17.8 GFLOPs (measured)."""
    return _fan('large_16_p4_hybrid', True, pretrained, kwargs)


@register_model
def tap_fan_xlarge_16_p4_hybrid(pretrained: bool = False, **kwargs) -> FAN:
    """TAP-FAN-XL-Hybrid @ 224 (official ``tap_fan_Xlarge_16_p4_hybrid``): 20 x 528 + 3 x 768 blocks.

    120.9M params, 21.2 GFLOPs (measured).
    """
    return _fan('xlarge_16_p4_hybrid', True, pretrained, kwargs)


@register_model
def fan_tiny_12_p16_224(pretrained: bool = False, **kwargs) -> FAN:
    """FAN-T-ViT @ 224 (no TAP). 7.3M params, 1.5 GFLOPs (measured)."""
    return _fan('tiny_12_p16_224', False, pretrained, kwargs)


@register_model
def fan_small_12_p16_224(pretrained: bool = False, **kwargs) -> FAN:
    """FAN-S-ViT @ 224 (no TAP). 28.4M params, 5.5 GFLOPs (measured)."""
    return _fan('small_12_p16_224', False, pretrained, kwargs)


@register_model
def fan_small_12_p16_224_se_attn(pretrained: bool = False, **kwargs) -> FAN:
    """FAN-S-ViT with SE-MLP blocks instead of channel processing @ 224 (no TAP).

    27.4M params, 5.1 GFLOPs (measured).
    """
    return _fan('small_12_p16_224_se_attn', False, pretrained, kwargs)


@register_model
def fan_base_18_p16_224(pretrained: bool = False, **kwargs) -> FAN:
    """FAN-B-ViT @ 224 (no TAP). 54.4M params, 10.7 GFLOPs (measured)."""
    return _fan('base_18_p16_224', False, pretrained, kwargs)


@register_model
def fan_large_24_p16_224(pretrained: bool = False, **kwargs) -> FAN:
    """FAN-L-ViT @ 224 (no TAP). 80.6M params, 16.0 GFLOPs (measured)."""
    return _fan('large_24_p16_224', False, pretrained, kwargs)


@register_model
def fan_tiny_8_p4_hybrid(pretrained: bool = False, **kwargs) -> FAN:
    """FAN-T-Hybrid @ 224 (no TAP). 7.5M params, 3.6 GFLOPs (measured)."""
    return _fan('tiny_8_p4_hybrid', False, pretrained, kwargs)


@register_model
def fan_small_12_p4_hybrid(pretrained: bool = False, **kwargs) -> FAN:
    """FAN-S-Hybrid @ 224 (no TAP, 10 blocks). 26.1M params, 7.0 GFLOPs (measured)."""
    return _fan('small_12_p4_hybrid', False, pretrained, kwargs)


@register_model
def fan_base_16_p4_hybrid(pretrained: bool = False, **kwargs) -> FAN:
    """FAN-B-Hybrid @ 224 (no TAP; the TAP + ADL paper's baseline). 50.5M params, 11.8 GFLOPs (measured)."""
    return _fan('base_16_p4_hybrid', False, pretrained, kwargs)


@register_model
def fan_large_16_p4_hybrid(pretrained: bool = False, **kwargs) -> FAN:
    """FAN-L-Hybrid @ 224 (no TAP, 22 blocks). 76.9M params, 17.7 GFLOPs (measured)."""
    return _fan('large_16_p4_hybrid', False, pretrained, kwargs)


@register_model
def fan_xlarge_16_p4_hybrid(pretrained: bool = False, **kwargs) -> FAN:
    """FAN-XL-Hybrid @ 224 (no TAP): 20 x 528 + 3 x 768 blocks. 120.4M params, 21.1 GFLOPs (measured)."""
    return _fan('xlarge_16_p4_hybrid', False, pretrained, kwargs)
