"""Agent-CSwin

Agent Attention: On the Integration of Softmax and Linear Attention (Han et al., ECCV 2024)
    - https://arxiv.org/abs/2312.08874
CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows (Dong et al., CVPR 2022)
    - https://arxiv.org/abs/2107.00652
Official code: https://github.com/LeapLabTHU/Agent-Attention (``agent_transformer/models/agent_cswin.py``), built on
https://github.com/microsoft/CSWin-Transformer (MIT).

A four-stage CSWin whose stages follow ``attn_type`` ('AABB' in every released variant):

- 'A' stages use one global agent-attention branch with the full width / heads (the official ``last_stage`` case, split
  == resolution); the DWC term is CSwin's LePE conv ``get_v``.
- 'B' stages use CSwin's LePE attention: two branches of half width / heads over vertical (full height x
  ``split_size``) and horizontal (``split_size`` x full width) stripes, or, in the last stage (or when the split
  covers the map), one global branch. The LePE term (a 3x3 depthwise conv of v inside each window) is added after the
  softmax, so the attention itself runs through ``F.scaled_dot_product_attention`` (``fused_attn``).

The block owns ``qkv``, ``proj``, ``norm1``, ``norm2`` and ``mlp``; the attentions only see projected tokens.
Modules use timm names (``patch_embed``, ``stages.{i}.downsample``, ``stages.{i}.blocks.{j}``); official checkpoints
(``stage1_conv_embed``, ``stageK.i``, ``mergeK``) are remapped by :func:`checkpoint_filter_fn`.

Other resolutions (the official model runs only at its construction size). Any input whose sides are multiples of 4
(the stem stride) runs; the merges round odd maps up (``ceil``), as their stride-2 convs do:

- agent stages stay global over whatever map they get; ``AgentAttention`` resizes its row/column biases to the grid;
- a striped LePE branch zero-pads the map (after the qkv projection) to a multiple of ``split_size`` along its split
  axis and masks the padded keys, so the last stripe behaves exactly like a narrower stripe (its LePE conv already
  sees zeros past the border); at sizes that divide evenly nothing is padded and the results are unchanged;
- a global LePE branch (the last stage) simply covers the whole map.

A model built at another ``img_size`` builds its agent biases for that size; official 224 checkpoints are resized on
load. ``la_split_size`` defaults to None (agent stages global at the construction size, which is what the official
'56-28-14-7' / '96-48-24-12' mean at 224 / 384); an official string is accepted, and a split >= the stage resolution
is global. Striped agent branches (an agent split smaller than the stage resolution) are not supported: no released
model uses them. Written for vitzoo.
"""
import logging
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import DropPath, to_2tuple, use_fused_attn
from timm.models import checkpoint_seq, generate_default_cfgs, register_model

from vitzoo.layers.agent_attention import AgentAttention, split_qkv
from vitzoo.layers.sdpa import use_sdpa
from vitzoo.layers.windows import pad_to_windows, padded_key_mask, window_padding, window_partition, window_reverse
from vitzoo.layers.linear import Linear
from ._base import default_layers
from ._builder import build_model_with_cfg
from ._helpers import Mlp, finish_state_dict, unwrap_state_dict
from ._hierarchical import HierarchicalShell, agent_cfg, stage_agent_blocks, stage_build_kwargs
from ._manifest import manifest_cfg

__all__ = ['AgentCSwinTransformer', 'AgentCSWinTransformer']

_logger = logging.getLogger(__name__)

_STEM_STRIDE = 4


class LePEAttention(nn.Module):
    """CSwin's cross-shaped window attention with the locally-enhanced positional encoding (LePE).

    Per window: ``softmax(q kᵀ s) v + get_v(v)``, with ``get_v`` a 3x3 depthwise conv applied to v inside each window.

    Args:
        dim: Channels of this branch.
        num_heads: Heads of this branch.
        idx: -1 global (one window = the whole map), 0 vertical stripes (full height x ``split_size``),
            1 horizontal stripes (``split_size`` x full width).
        split_size: Stripe width.
        attn_drop: Attention dropout.
        fused_attn: Use ``F.scaled_dot_product_attention``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            idx: int = -1,
            split_size: int = 7,
            attn_drop: float = 0.0,
            fused_attn: bool = True,
    ):
        super().__init__()
        if idx not in (-1, 0, 1):
            raise ValueError(f'LePEAttention: idx must be -1, 0 or 1, got {idx}')
        if dim % num_heads:
            raise ValueError(f'LePEAttention: dim {dim} must be divisible by num_heads {num_heads}')
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.idx = idx
        self.split_size = split_size
        self.fused_attn = fused_attn
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)
        self.attn_drop = nn.Dropout(attn_drop)

    def _window(self, h: int, w: int) -> Tuple[int, int]:
        """Window (wh, ww) for an (h, w) map: the map, a full-height or a full-width stripe."""
        return (h, w) if self.idx == -1 else (h, self.split_size) if self.idx == 0 else (self.split_size, w)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """Attend inside the windows of an (h, w) token grid.

        Args:
            q: (B, h*w, C) projected queries (row-major tokens).
            k: (B, h*w, C) projected keys.
            v: (B, h*w, C) projected values.
            hw: The grid (h, w).

        Returns:
            (B, h*w, C), LePE term included.
        """
        B, N, C = q.shape
        h, w = hw
        wh, ww = window = self._window(h, w)
        ph, pw = window_padding(hw, window)

        def to_windows(t: torch.Tensor) -> torch.Tensor:
            return window_partition(pad_to_windows(t.reshape(B, h, w, C), window)[0], window).flatten(0, 1)

        q, k, v = to_windows(q), to_windows(k), to_windows(v)
        Bw, n, _ = q.shape
        lepe = self.get_v(v.transpose(1, 2).reshape(Bw, C, wh, ww)).reshape(Bw, C, n).transpose(1, 2)
        H, d = self.num_heads, self.head_dim
        q = q.reshape(Bw, n, H, d).transpose(1, 2)
        k = k.reshape(Bw, n, H, d).transpose(1, 2)
        v = v.reshape(Bw, n, H, d).transpose(1, 2)
        mask = None
        if ph or pw:
            # additive key mask (nWin, 1, 1, n): -inf on the zero-padded positions of each window
            pad = padded_key_mask(hw, window, device=q.device)
            mask = torch.zeros(pad.shape, device=q.device, dtype=q.dtype).masked_fill_(pad, float('-inf'))
            mask = mask[:, None, None, :].repeat(B, 1, 1, 1)  # windows are batch-major
        if self.fused_attn and use_sdpa(q, k, v, mask):
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if mask is not None:
                attn = attn + mask
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(Bw, n, C) + lepe
        x = window_reverse(x, window, (h + ph, w + pw))
        if ph or pw:
            x = x[:, :h, :w]
        return x.reshape(B, h * w, C)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, idx={self.idx}, split_size={self.split_size}, '
                f'fused_attn={self.fused_attn}')


class CSWinBlock(nn.Module):
    """Pre-norm CSwin block: qkv → one or two attention branches → proj, then the MLP.

    Args:
        dim: Channels.
        num_heads: Heads (split evenly across two branches).
        resolution: Construction-time (h, w) of this stage (sets the agent bias window).
        attn_type: 'A' (agent attention, global) or 'B' (LePE cross-shaped windows).
        split_size: Stripe width ('B'); ignored for global blocks.
        last_stage: Force one global branch.
        agent_num: Agents ('A').
        mlp_ratio: MLP expansion.
        qkv_bias: Bias in qkv.
        proj_drop: Dropout after proj / in the MLP.
        attn_drop: Attention dropout.
        drop_path: Stochastic depth.
        act_layer: MLP activation.
        norm_layer: Norm.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            resolution: Tuple[int, int],
            attn_type: str = 'B',
            split_size: int = 7,
            last_stage: bool = False,
            agent_num: int = 49,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
            drop_path: float = 0.0,
            act_layer: Callable = nn.GELU,
            norm_layer: Callable = nn.LayerNorm,
    ):
        super().__init__()
        if attn_type not in ('A', 'B'):
            raise ValueError(f"CSWinBlock: attn_type must be 'A' or 'B', got {attn_type!r}")
        # Official rule: split == resolution makes the block global; a split covering the map is the same thing.
        last_stage = last_stage or split_size >= max(resolution)
        if attn_type == 'A' and not last_stage:
            raise ValueError(
                f'CSWinBlock: striped agent attention (split {split_size} < resolution {tuple(resolution)}) is not '
                f'supported; agent stages must be global (la_split_size >= the stage resolution)')
        self.is_agent = attn_type == 'A'
        self.norm1 = norm_layer(dim)
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        if self.is_agent:
            self.attns = nn.ModuleList([AgentAttention(
                dim, num_heads=num_heads, agent_num=agent_num, window_size=tuple(resolution), qkv_bias=qkv_bias,
                attn_drop=attn_drop, qkv_layout='none', proj=False, dwc_name='get_v', fused_attn=use_fused_attn())])
        elif last_stage:
            self.attns = nn.ModuleList([LePEAttention(
                dim, num_heads, idx=-1, split_size=split_size, attn_drop=attn_drop, fused_attn=use_fused_attn())])
        else:
            self.attns = nn.ModuleList([LePEAttention(
                dim // 2, num_heads // 2, idx=i, split_size=split_size, attn_drop=attn_drop,
                fused_attn=use_fused_attn()) for i in range(2)])
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def _attend(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw: Tuple[int, int]):
        return attn.forward_qkv(q, k, v, hw) if self.is_agent else attn(q, k, v, hw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        if self.is_agent and self.attns[0].use_factored():
            # the agent core projects only what it needs from the normalised tokens (see AgentAttention)
            y = self.attns[0].attend(self.norm1(x), (H, W), split_qkv(self.qkv.weight, self.qkv.bias))
            x = x + self.drop_path1(self.proj_drop(self.proj(y)))
            x = x + self.drop_path2(self.mlp(self.norm2(x)))
            return x.reshape(B, H, W, C)
        q, k, v = self.qkv(self.norm1(x)).reshape(B, H * W, 3, C).unbind(2)
        if len(self.attns) == 2:
            c = C // 2
            y = torch.cat([
                self._attend(self.attns[0], q[..., :c], k[..., :c], v[..., :c], (H, W)),
                self._attend(self.attns[1], q[..., c:], k[..., c:], v[..., c:], (H, W)),
            ], dim=-1)
        else:
            y = self._attend(self.attns[0], q, k, v, (H, W))
        x = x + self.drop_path1(self.proj_drop(self.proj(y)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)


class ConvStem(nn.Module):
    """Conv 7x7 stride 4 (pad 2) → LayerNorm; NCHW image in, NHWC map out (official ``stage1_conv_embed``)."""

    def __init__(self, in_chans: int, dim: int, norm_layer: Callable = nn.LayerNorm):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=7, stride=4, padding=2)
        self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class MergeBlock(nn.Module):
    """Conv 3x3 stride 2 (pad 1) → LayerNorm on NHWC maps (official ``mergeK``)."""

    def __init__(self, dim: int, dim_out: int, norm_layer: Callable = nn.LayerNorm):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, kernel_size=3, stride=2, padding=1)
        self.norm = norm_layer(dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class CSWinStage(nn.Module):
    """Optional downsample (a :class:`MergeBlock`) then a sequence of :class:`CSWinBlock` on NHWC maps."""

    def __init__(self, downsample: Optional[nn.Module], blocks: List[nn.Module]):
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


def _per_stage(value: Union[int, str, Sequence[int], None], name: str) -> Optional[List[int]]:
    """An int, an official 'a-b-c-d' string or a 4-sequence -> list of 4 ints (None stays None)."""
    if value is None:
        return None
    if isinstance(value, int):
        return [value] * 4
    if isinstance(value, str):
        value = value.split('-')
    value = [int(v) for v in value]
    if len(value) != 4:
        raise ValueError(f'{name} needs 4 per-stage values, got {value}')
    return value


class AgentCSwinTransformer(HierarchicalShell):
    """CSwin Transformer with agent attention in the 'A' stages; stages output (B, h, w, C) maps.

    Args:
        img_size: Construction resolution (sets the agent bias windows; other sizes run too).
        patch_size: Ignored (the stem is a 7x7 stride-4 conv); accepted for the official signature.
        in_chans: Input channels.
        num_classes: Classifier classes (0 = no head).
        global_pool: 'avg' (default) or '' (no pooling: ``forward_head`` returns the NHWC map).
        embed_dim: Width of stage 1 (doubles per stage).
        depth: Blocks per stage.
        split_size: Stripe widths of the 'B' (LePE) stages.
        la_split_size: Split of the 'A' stages (official '56-28-14-7'); must be >= the stage resolution (global).
            None = global at every stage.
        num_heads: Heads per stage.
        mlp_ratio: MLP expansion.
        qkv_bias: Bias in qkv.
        agent_num: Agents per stage (int, 4-sequence or '9-16-49-49').
        attn_type: One letter per stage: 'A' agent, 'B' LePE, 'M' mixed (suffix = number of leading agent blocks).
        drop_rate: Dropout before the head.
        proj_drop_rate: Dropout after proj / in the MLPs.
        attn_drop_rate: Attention dropout.
        drop_path_rate: Stochastic depth (linear rule over all blocks).
        norm_layer: Norm (default LayerNorm, eps 1e-5 as the official model).
        act_layer: MLP activation.
    """

    stride_name = 'stem stride'

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 64,
            depth: Sequence[int] = (2, 4, 18, 1),
            split_size: Union[int, str, Sequence[int]] = (1, 2, 7, 7),
            la_split_size: Union[int, str, Sequence[int], None] = None,
            num_heads: Union[int, Sequence[int]] = (2, 4, 8, 16),
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            agent_num: Union[int, str, Sequence[int]] = (9, 16, 49, 49),
            attn_type: str = 'AABB',
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_layer: Optional[Callable] = None,
            act_layer: Optional[Callable] = None,
            **kwargs,
    ):
        super().__init__(num_classes, global_pool)
        norm_layer, act_layer = default_layers(norm_layer, act_layer, norm_eps=None)
        depth = list(depth)
        if len(depth) != 4:
            raise ValueError(f'depth needs 4 stages, got {depth}')
        num_heads = _per_stage(num_heads, 'num_heads')
        split_size = _per_stage(split_size, 'split_size')
        la_split_size = _per_stage(la_split_size, 'la_split_size')
        agent_num = _per_stage(agent_num, 'agent_num')
        agent_blocks = stage_agent_blocks(attn_type, depth)
        self.patch_size = _STEM_STRIDE  # inputs must be multiples of the stem's stride (``patch_size`` is ignored)

        self.patch_embed = ConvStem(in_chans, embed_dim, norm_layer=norm_layer)
        img_size = to_2tuple(img_size)
        res = (img_size[0] // _STEM_STRIDE, img_size[1] // _STEM_STRIDE)
        dpr = self._drop_path_rates(drop_path_rate, depth)
        dims = [embed_dim * 2 ** i for i in range(4)]
        stages, self.feature_info = [], []
        for i in range(4):
            if i > 0:
                res = ((res[0] + 1) // 2, (res[1] + 1) // 2)  # stride-2 conv, pad 1: ceil
            blocks = []
            for j in range(depth[i]):
                t = 'A' if j < agent_blocks[i] else 'B'
                split = (la_split_size[i] if la_split_size is not None else max(res)) if t == 'A' else split_size[i]
                blocks.append(CSWinBlock(
                    dims[i], num_heads[i], resolution=res, attn_type=t, split_size=split, last_stage=i == 3,
                    agent_num=agent_num[i], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate, drop_path=dpr[i][j], act_layer=act_layer, norm_layer=norm_layer))
            downsample = MergeBlock(dims[i - 1], dims[i], norm_layer=norm_layer) if i > 0 else None
            stages.append(CSWinStage(downsample, blocks))
            self.feature_info.append(dict(num_chs=dims[i], reduction=_STEM_STRIDE * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = dims[-1]
        self._init_head(norm_layer(self.num_features), drop_rate)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1, 2).mean(dim=1)  # mean over tokens, as the official model


AgentCSWinTransformer = AgentCSwinTransformer  # deprecated spelling


_KEY_MAP = (
    (re.compile(r'^stage1_conv_embed\.0\.'), lambda m: 'patch_embed.proj.'),
    (re.compile(r'^stage1_conv_embed\.2\.'), lambda m: 'patch_embed.norm.'),
    (re.compile(r'^stage(\d)\.(\d+)\.'), lambda m: f'stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.'),
    (re.compile(r'^merge(\d)\.'), lambda m: f'stages.{m.group(1)}.downsample.'),
)


def _remap_key(k: str) -> str:
    for pattern, repl in _KEY_MAP:
        k, n = pattern.subn(repl, k, count=1)
        if n:
            break
    return k


def checkpoint_filter_fn(state_dict: Dict, model: AgentCSwinTransformer) -> Dict[str, torch.Tensor]:
    """Load an official Agent-CSwin checkpoint (official or vitzoo key names) into ``model``.

    Renames the official keys (``stage1_conv_embed.{0,2}`` → ``patch_embed.{proj,norm}``, ``stageK.i`` →
    ``stages.{K-1}.blocks.i``, ``mergeK`` → ``stages.K.downsample``), resizes the agent row/column biases when the
    model was built at another resolution (:meth:`AgentAttention.adapt_state_dict`), then checks every key and shape,
    raising :class:`~vitzoo.models._helpers.CheckpointError` that names the key.
    """
    out = {_remap_key(k): v for k, v in unwrap_state_dict(state_dict).items()}
    return finish_state_dict(out, model)


def _create_agent_cswin(variant: str, pretrained: bool = False, **kwargs) -> AgentCSwinTransformer:
    return build_model_with_cfg(
        AgentCSwinTransformer, variant, pretrained, **stage_build_kwargs(checkpoint_filter_fn, **kwargs))


default_cfgs = generate_default_cfgs({
    'agent_cswin_tiny.in1k': agent_cfg(**manifest_cfg('agent_cswin_tiny.in1k')),
    'agent_cswin_small.in1k': agent_cfg(**manifest_cfg('agent_cswin_small.in1k')),
    'agent_cswin_base.in1k': agent_cfg(**manifest_cfg('agent_cswin_base.in1k')),
    # agent_cswin_b_384.yaml keeps TEST.CROP: Resize((438, 438)) -> CenterCrop(384)
    'agent_cswin_base_384.in1k': agent_cfg(
        input_size=(3, 384, 384), pool_size=(12, 12), **manifest_cfg('agent_cswin_base_384.in1k')),
})


@register_model
def agent_cswin_tiny(pretrained: bool = False, **kwargs) -> AgentCSwinTransformer:
    """Agent-CSwin-T @ 224 (official ``Agent_CSWin_64_24181_tiny_224``). 20.5M params, 4.3 GFLOPs, 83.1% top-1."""
    model_args = dict(
        embed_dim=64, depth=(2, 4, 18, 1), split_size=(1, 2, 7, 7), num_heads=(2, 4, 8, 16),
        agent_num=(9, 16, 49, 49), attn_type='AABB')
    return _create_agent_cswin('agent_cswin_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_cswin_small(pretrained: bool = False, **kwargs) -> AgentCSwinTransformer:
    """Agent-CSwin-S @ 224 (official ``Agent_CSWin_64_36292_small_224``). 32.8M params, 6.8 GFLOPs, 83.9% top-1."""
    model_args = dict(
        embed_dim=64, depth=(3, 6, 29, 2), split_size=(1, 2, 7, 7), num_heads=(2, 4, 8, 16),
        agent_num=(9, 16, 49, 49), attn_type='AABB')
    return _create_agent_cswin('agent_cswin_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_cswin_base(pretrained: bool = False, **kwargs) -> AgentCSwinTransformer:
    """Agent-CSwin-B @ 224 (official ``Agent_CSWin_96_36292_base_224``). 73.3M params, 14.9 GFLOPs, 84.7% top-1."""
    model_args = dict(
        embed_dim=96, depth=(3, 6, 29, 2), split_size=(1, 2, 7, 7), num_heads=(4, 8, 16, 32),
        agent_num=(9, 16, 49, 49), attn_type='AABB')
    return _create_agent_cswin('agent_cswin_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_cswin_base_384(pretrained: bool = False, **kwargs) -> AgentCSwinTransformer:
    """Agent-CSwin-B @ 384 (official ``Agent_CSWin_96_36292_base_384``, split 12, agent split 96-48-24-12).
    73.3M params, 46.3 GFLOPs, 85.8% top-1."""
    model_args = dict(
        img_size=384, embed_dim=96, depth=(3, 6, 29, 2), split_size=(1, 2, 12, 12), num_heads=(4, 8, 16, 32),
        agent_num=(9, 16, 49, 49), attn_type='AABB')
    return _create_agent_cswin('agent_cswin_base_384', pretrained=pretrained, **dict(model_args, **kwargs))
