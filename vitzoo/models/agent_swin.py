"""Agent-Swin

Agent Attention: On the Integration of Softmax and Linear Attention (Han et al., ECCV 2024)
    - https://arxiv.org/abs/2312.08874
Official code: https://github.com/LeapLabTHU/Agent-Attention (``agent_transformer/models/agent_swin.py``),
built on Swin Transformer (Liu et al., https://arxiv.org/abs/2103.14030).

A four-stage Swin whose stages are chosen by ``attn_type`` (one letter per stage, e.g. 'AAAB', 'AAMB2'):

- 'A': every block is an agent block. Agent blocks are **global** over the whole stage map (the official models use a
  ``WINDOW_SIZE`` equal to the stage-1 resolution, which the official block clamps to the map, shift 0);
- 'B': standard Swin (shifted-)window attention, window ``max(7, window_size // 8)``, shift ``window // 2`` on odd
  blocks unless the stage map at construction is no larger than the window (then one unshifted window, as official);
- 'M': the first ``int(attn_type[4:])`` blocks are agent blocks, the rest window blocks.

Module layout follows timm's Swin: ``layers.{i}`` with the PatchMerging at the *start* of stage i
(``layers.{i}.downsample``, absent for stage 0) and the plain ``head`` Linear of the official model.
:func:`checkpoint_filter_fn` moves the official ``layers.{i}.downsample`` (end of stage i) to ``layers.{i+1}``, drops
the recomputed ``relative_position_index`` / ``attn_mask`` buffers and resizes bias tables to the model.

Other resolutions (a model built at 224 runs at any multiple of the patch size 4, square or not):

- agent blocks stay global; their row/column biases are resized to the map at run time (``AgentAttention``);
- window blocks keep the trained window ``ws``. Per axis, a map no larger than ``ws`` becomes one window of the map's
  size (no shift on that axis; the relative-position table is indexed, not interpolated), as the official
  construction-time clamp. A larger axis keeps ``ws`` and the block's trained shift, and is zero-padded bottom/right to
  a multiple of ``ws``; unlike timm / mmdet, padded positions are masked out of the keys, so results do not depend on
  the padding. At the construction size with maps that are multiples of the window this is exactly the official model;
- PatchMerging zero-pads odd maps (e.g. 280 px: 70 -> 35 -> 18 -> 9), as timm's Swin;
- a model built at another ``img_size`` sizes its agent bias tables to its own stage maps; official 224 checkpoints are
  resized into it (linear for the agent row/column biases, bicubic for window tables as the official Swin loader).
  Agent blocks are global there too, where the official code would partition a map larger than ``window_size``.

Beyond the original: any input resolution, fused attention (SDPA) for both attention kinds, ``features_only``, grad
checkpointing. Written for vitzoo.
"""
import logging
import re
from typing import Callable, Dict, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import PatchEmbed, resize_rel_pos_bias_table_simple, trunc_normal_, use_fused_attn
from timm.models import checkpoint, generate_default_cfgs, register_model

from vitzoo.layers.agent_attention import AgentAttention
from vitzoo.layers.sdpa import use_sdpa
from vitzoo.layers.windows import pad_to_windows, padded_key_mask, window_padding, window_partition, window_reverse
from vitzoo.layers.linear import Linear
from ._base import default_layers
from ._blocks import PreNormBlock
from ._builder import build_model_with_cfg
from ._helpers import finish_state_dict, unwrap_state_dict
from ._hierarchical import HierarchicalShell, agent_cfg, stage_agent_blocks, stage_build_kwargs
from ._manifest import manifest_cfg

__all__ = ['AgentSwinTransformer']

_logger = logging.getLogger(__name__)

_MASK_VALUE = -100.0  # the official Swin mask value


def relative_position_index(window_size: int) -> torch.Tensor:
    """(ws², ws²) index into a ((2ws-1)², heads) relative-position table (the Swin layout)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing='ij'))
    coords = coords.flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
    return rel[..., 0] * (2 * window_size - 1) + rel[..., 1]


def window_attn_mask(
        hw: Tuple[int, int],
        window: Tuple[int, int],
        shift: Tuple[int, int],
) -> Optional[torch.Tensor]:
    """Additive (nW, N, N) mask for shifted windows and padded keys, or None when neither applies.

    Args:
        hw: The unpadded map (H, W).
        window: Window (wh, ww); the map is padded to multiples of it.
        shift: Cyclic shift (sh, sw) applied to the padded map before partitioning.
    """
    (H, W), (wh, ww), (sh, sw) = hw, window, shift
    ph, pw = window_padding(hw, window)
    if not (sh or sw or ph or pw):
        return None
    regions = torch.zeros(1, H + ph, W + pw, 1)
    cnt = 0
    # the shifted map wraps around at its bottom/right: tokens from both sides of the seam must not attend
    for hs in ((slice(0, -wh), slice(-wh, -sh), slice(-sh, None)) if sh else (slice(None),)):
        for ws in ((slice(0, -ww), slice(-ww, -sw), slice(-sw, None)) if sw else (slice(None),)):
            regions[:, hs, ws, :] = cnt
            cnt += 1
    regions = window_partition(regions, window)[0, ..., 0]  # nW, N
    pad = padded_key_mask(hw, window, shift)
    masked = (regions[:, None, :] != regions[:, :, None]) | pad[:, None, :]
    return torch.zeros(masked.shape).masked_fill(masked, _MASK_VALUE)


class WindowAttention(nn.Module):
    """Swin window attention with a relative-position bias table, fused (SDPA) or explicit.

    The table is built for a ``window_size`` square window; smaller windows (maps smaller than the window) index the
    central part of the same table.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            window_size: int = 7,
            qkv_bias: bool = True,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
    ):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.window_size = (window_size, window_size)
        self.fused_attn = use_fused_attn()
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer('relative_position_index', relative_position_index(window_size), persistent=False)
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def adapt_state_dict(self, state_dict: Dict[str, torch.Tensor], prefix: str = '') -> None:
        """Resize a checkpoint's relative-position table (keys under ``prefix``) trained for another window, in place.

        Bicubic, as the official Swin loader; anything else that differs is left for the family's key check.
        """
        k = prefix + 'relative_position_bias_table'
        v, own = state_dict.get(k), self.relative_position_bias_table.shape
        if v is not None and v.shape != own and v.ndim == 2 and v.shape[1] == own[1]:
            state_dict[k] = resize_rel_pos_bias_table_simple(v, self.window_size, tuple(own))

    def _rel_pos_bias(self, window: Tuple[int, int]) -> torch.Tensor:
        ws = self.window_size[0]
        index = self.relative_position_index
        if tuple(window) != (ws, ws):
            sel = (torch.arange(window[0], device=index.device)[:, None] * ws +
                   torch.arange(window[1], device=index.device)).flatten()
            index = index[sel][:, sel]
        n = index.shape[0]
        return self.relative_position_bias_table[index.reshape(-1)].view(n, n, -1).permute(2, 0, 1)  # H, N, N

    def forward(self, x: torch.Tensor, window: Tuple[int, int], mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attend within windows.

        Args:
            x: (B, nW, N, C) window tokens, N = wh * ww.
            window: (wh, ww), each at most the table's window size.
            mask: Optional additive (nW, N, N) mask.
        """
        B, nW, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, nW, N, 3, self.num_heads, self.head_dim).permute(3, 0, 1, 4, 2, 5).unbind(0)
        bias = self._rel_pos_bias(window).to(q.dtype)  # H, N, N
        if self.fused_attn and use_sdpa(q, k, v, bias):
            attn_mask = bias if mask is None else bias + mask.to(q.dtype).unsqueeze(1)
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + bias
            if mask is not None:
                attn = attn + mask.to(q.dtype).unsqueeze(1)
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(2, 3).reshape(B, nW, N, C)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, '
                f'fused_attn={self.fused_attn}')


class AgentSwinBlock(PreNormBlock):
    """Pre-norm Swin block on (B, H, W, C) maps: global agent attention or (shifted-)window attention."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            input_resolution: Tuple[int, int],
            agent_num: int = 0,
            window_size: int = 7,
            shift: bool = False,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
            drop_path: float = 0.0,
            act_layer: Callable = nn.GELU,
            norm_layer: Callable = nn.LayerNorm,
            always_shift: bool = False,
    ):
        input_resolution = tuple(input_resolution)
        if agent_num > 0:
            attn_layer, attn_kwargs = AgentAttention, dict(
                agent_num=agent_num, window_size=input_resolution, qkv_layout='qkv', fused_attn=use_fused_attn())
        else:
            attn_layer, attn_kwargs = WindowAttention, dict(window_size=window_size)
        super().__init__(
            dim, num_heads, attn_layer, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop,
            attn_drop=attn_drop, drop_path=drop_path, act_layer=act_layer, norm_layer=norm_layer, **attn_kwargs)
        self.is_agent = agent_num > 0
        self.input_resolution = input_resolution
        self.window_size = window_size
        # official classification model: one unshifted window when the construction map is no larger than the
        # window; the official downstream (dense) Swin shifts every odd block regardless (``always_shift``)
        shift = shift and (always_shift or min(input_resolution) > window_size)
        self.shift_size = window_size // 2 if shift else 0
        mask = None
        if not self.is_agent:
            window, shift_hw = self._window_shift(*input_resolution)
            mask = window_attn_mask(input_resolution, window, shift_hw)
        self.register_buffer('attn_mask', mask, persistent=False)

    def _window_shift(self, H: int, W: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """Per axis: a map no larger than the window is one window without shift; otherwise the trained values."""
        ws, s = self.window_size, self.shift_size
        wh, sh = (H, 0) if H <= ws else (ws, s)
        ww, sw = (W, 0) if W <= ws else (ws, s)
        return (wh, ww), (sh, sw)

    def _window_attn(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        window, (sh, sw) = self._window_shift(H, W)
        x, (ph, pw) = pad_to_windows(x, window)
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        if (H, W) == self.input_resolution:
            mask = self.attn_mask
        else:
            mask = window_attn_mask((H, W), window, (sh, sw))
            mask = mask.to(x.device) if mask is not None else None
        x = window_reverse(self.attn(window_partition(x, window), window, mask), window, (H + ph, W + pw))
        if sh or sw:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x[:, :H, :W] if (ph or pw) else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if self.is_agent:
            y = self.attn(self.norm1(x).reshape(B, H * W, C), (H, W)).reshape(B, H, W, C)
        else:
            y = self._window_attn(self.norm1(x))
        return self._mlp_residual(x + self.drop_path1(y))

    def extra_repr(self) -> str:
        kind = 'agent (global)' if self.is_agent else f'window={self.window_size}, shift={self.shift_size}'
        return f'input_resolution={self.input_resolution}, {kind}'


class PatchMerging(nn.Module):
    """2x2 patch merging on (B, H, W, C) maps (official channel order x00, x10, x01, x11); odd maps are zero-padded."""

    def __init__(self, dim: int, out_dim: Optional[int] = None, norm_layer: Callable = nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim or 2 * dim
        self.norm = norm_layer(4 * dim)
        self.reduction = Linear(4 * dim, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        # (B, H/2, 2, W/2, 2, C) -> column offset major, row offset minor: [x00, x10, x01, x11]
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class AgentSwinStage(nn.Module):
    """One stage: optional PatchMerging (timm layout: at the start), then blocks."""

    def __init__(
            self,
            dim: int,
            out_dim: int,
            input_resolution: Tuple[int, int],
            depth: int,
            num_heads: int,
            downsample: bool,
            agent_num: int,
            num_agent_blocks: int,
            window_size: int,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
            drop_path: Sequence[float] = (),
            act_layer: Callable = nn.GELU,
            norm_layer: Callable = nn.LayerNorm,
            always_shift: bool = False,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = PatchMerging(dim, out_dim, norm_layer=norm_layer) if downsample else nn.Identity()
        self.blocks = nn.ModuleList([
            AgentSwinBlock(
                out_dim, num_heads, input_resolution, agent_num=agent_num if i < num_agent_blocks else 0,
                window_size=window_size, shift=i % 2 == 1, always_shift=always_shift, mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias, proj_drop=proj_drop, attn_drop=attn_drop, drop_path=drop_path[i],
                act_layer=act_layer, norm_layer=norm_layer)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x)
            else:
                x = blk(x)
        return x


class AgentSwinTransformer(HierarchicalShell):
    """Swin Transformer with global agent-attention blocks in the stages chosen by ``attn_type``.

    Stages live in ``layers`` (timm's Swin layout) and output (B, H, W, C) maps.

    Args:
        img_size: Construction resolution (sizes the agent bias tables and the shift decisions; others run too).
        patch_size: Patch size.
        in_chans: Input channels.
        num_classes: Classifier classes (0 = no head).
        global_pool: 'avg' or '' (no pooling: ``forward_head`` returns the (B, H, W, C) map).
        embed_dim: Stage-1 width (doubled per stage).
        depths: Blocks per stage.
        num_heads: Heads per stage.
        window_size: The official ``WINDOW_SIZE`` (56 / 72 / 96); window blocks use ``max(7, window_size // 8)``.
        mlp_ratio: MLP expansion.
        qkv_bias: Bias in qkv.
        agent_num: Agents per stage.
        attn_type: Per-stage attention string, e.g. 'AAAB', 'AABB', 'AAMB2'.
        patch_norm: LayerNorm after the patch embedding.
        drop_rate: Dropout before the head.
        proj_drop_rate: Dropout after projections / MLP.
        attn_drop_rate: Attention dropout.
        drop_path_rate: Stochastic depth (linear rule over all blocks).
        norm_layer: Norm (default LayerNorm eps 1e-5, as official).
        act_layer: MLP activation.
        ape: Must be False (no released Agent-Swin uses an absolute position embedding).
        always_shift: Shift every odd window block (``window // 2``), also where the stage map at construction is no
            larger than the window (the official classification model does not shift there; the official downstream
            Swin does).
    """

    trunk_name = 'layers'

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 96,
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (3, 6, 12, 24),
            window_size: int = 56,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            agent_num: Sequence[int] = (9, 16, 49, 49),
            attn_type: str = 'AAAB',
            patch_norm: bool = True,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_layer: Optional[Callable] = None,
            act_layer: Optional[Callable] = None,
            ape: bool = False,
            always_shift: bool = False,
            **kwargs,
    ):
        super().__init__(num_classes, global_pool)
        if ape:
            raise ValueError('AgentSwinTransformer: ape=True (absolute position embedding) is not supported')
        if len(num_heads) != len(depths) or len(agent_num) < len(depths):
            raise ValueError(f'depths {depths}, num_heads {num_heads} and agent_num {agent_num} must have one entry '
                             f'per stage')
        norm_layer, act_layer = default_layers(norm_layer, act_layer, norm_eps=None)
        self.patch_size = patch_size
        num_stages = len(depths)
        dims = [int(embed_dim * 2 ** i) for i in range(num_stages)]
        self.embed_dim = embed_dim
        self.num_features = self.head_hidden_size = dims[-1]
        self.window_size = window_size
        self.attn_window_size = max(7, window_size // 8)  # the official rule for non-agent blocks

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            norm_layer=norm_layer if patch_norm else None, flatten=False, output_fmt='NHWC', strict_img_size=False)
        res = tuple(self.patch_embed.grid_size)

        dpr = self._drop_path_rates(drop_path_rate, depths)
        agent_blocks = stage_agent_blocks(attn_type, depths)
        stages = []
        self.feature_info = []
        for i in range(num_stages):
            if i > 0:
                res = (-(-res[0] // 2), -(-res[1] // 2))  # PatchMerging pads odd maps
            stages.append(AgentSwinStage(
                dims[max(i - 1, 0)], dims[i], res, depths[i], num_heads[i], downsample=i > 0,
                agent_num=int(agent_num[i]), num_agent_blocks=agent_blocks[i], window_size=self.attn_window_size,
                always_shift=always_shift, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[i], act_layer=act_layer, norm_layer=norm_layer))
            self.feature_info.append(dict(num_chs=dims[i], reduction=patch_size * 2 ** i, module=f'layers.{i}'))
        self.layers = nn.Sequential(*stages)
        self._init_head(norm_layer(self.num_features), drop_rate)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        # official: no_weight_decay_keywords = {'relative_position_bias_table'}
        return {n for n, _ in self.named_parameters() if 'relative_position_bias_table' in n}


def checkpoint_filter_fn(state_dict: Dict, model: AgentSwinTransformer) -> Dict[str, torch.Tensor]:
    """Load an official Agent-Swin checkpoint (``{'model': state_dict}``, official key names) into ``model``.

    Moves the official end-of-stage PatchMerging (``layers.{i}.downsample``) to the start of the next stage, drops
    the recomputed ``relative_position_index`` / ``attn_mask`` buffers, lets the attentions resize what they own
    (agent row/column biases: linear; relative-position tables: bicubic, as the official Swin loader) when built for
    another resolution or window, then checks every key and shape, raising
    :class:`~vitzoo.models._helpers.CheckpointError` that names the key.
    """
    state_dict = unwrap_state_dict(state_dict)
    # official checkpoints merge at the end of a stage: stage 0 has a downsample, which vitzoo's layout never has
    official = any(k.startswith('layers.0.downsample.') for k in state_dict)
    out = {}
    for k, v in state_dict.items():
        if k.endswith(('relative_position_index', 'attn_mask')):
            continue
        if official:
            k = re.sub(r'^layers\.(\d+)\.downsample\.', lambda m: f'layers.{int(m.group(1)) + 1}.downsample.', k)
        out[k] = v
    return finish_state_dict(out, model)


def _create_agent_swin(variant: str, pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    return build_model_with_cfg(
        AgentSwinTransformer, variant, pretrained, **stage_build_kwargs(checkpoint_filter_fn, **kwargs))


default_cfgs = generate_default_cfgs({
    'agent_swin_tiny.in1k': agent_cfg(**manifest_cfg('agent_swin_tiny.in1k')),
    'agent_swin_small.in1k': agent_cfg(**manifest_cfg('agent_swin_small.in1k')),
    # agent_swin_s_288.yaml / agent_swin_b_384.yaml set TEST.CROP False: Resize((img, img)) only == squash at crop_pct 1
    'agent_swin_small_288.in1k': agent_cfg(
        input_size=(3, 288, 288), pool_size=(9, 9), crop_pct=1.0, **manifest_cfg('agent_swin_small_288.in1k')),
    'agent_swin_base.in1k': agent_cfg(**manifest_cfg('agent_swin_base.in1k')),
    'agent_swin_base_384.in1k': agent_cfg(
        input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, **manifest_cfg('agent_swin_base_384.in1k')),
})


@register_model
def agent_swin_tiny(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-T @ 224: agent stages 1-3 ('AAAB'). 29M params, 4.5 GFLOPs, 82.6% top-1."""
    model_args = dict(
        embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=56, attn_type='AAAB')
    return _create_agent_swin('agent_swin_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_small(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-S @ 224: agent stages 1-2 ('AABB'). 50M params, 8.7 GFLOPs, 83.7% top-1."""
    model_args = dict(
        embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=56, attn_type='AABB')
    return _create_agent_swin('agent_swin_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_small_288(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-S @ 288 ('AABB', window 72 -> attention window 9). 50M params, 14.6 GFLOPs, 84.1% top-1."""
    model_args = dict(
        img_size=288, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=72, attn_type='AABB')
    return _create_agent_swin('agent_swin_small_288', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_base(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-B @ 224: agent stages 1-2 + first 2 blocks of stage 3 ('AAMB2'). 88M, 15.4 GFLOPs, 84.0%."""
    model_args = dict(
        embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=56, attn_type='AAMB2')
    return _create_agent_swin('agent_swin_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_base_384(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-B @ 384 ('AAMB2', window 96 -> attention window 12). 88M params, 46.3 GFLOPs, 84.9% top-1."""
    model_args = dict(
        img_size=384, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=96,
        attn_type='AAMB2')
    return _create_agent_swin('agent_swin_base_384', pretrained=pretrained, **dict(model_args, **kwargs))
