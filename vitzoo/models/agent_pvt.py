"""Agent-PVT

Agent Attention: On the Integration of Softmax and Linear Attention (Han et al., ECCV 2024)
    - https://arxiv.org/abs/2312.08874
Official code: https://github.com/LeapLabTHU/Agent-Attention (``agent_transformer/models/agent_pvt.py``).

A PVT v1 pyramid (4 stages: patch embed conv 4x4 then 2x2, each with its own LayerNorm and position embedding, then
pre-norm blocks) whose attention is chosen per stage by ``attn_type``: 'A' = agent attention (with spatial reduction
``int(agent_sr_ratios[i])``, 1 in every released model), 'B' = PVT's spatial-reduction softmax attention with
``sr_ratios[i]``. The head is a linear layer on the mean of the last stage map; there is no final norm.

Module layout is timm-style (``stages.{i}.patch_embed``, ``stages.{i}.pos_embed``, ``stages.{i}.blocks.{j}``,
``head``); :func:`checkpoint_filter_fn` maps the official ``patch_embed{i}``, ``pos_embed{i}``, ``block{i}.{j}`` keys.

Other input resolutions: height and width must be multiples of the patch size (4) and at least 32, otherwise a
``ValueError`` is raised. As in the official code (classification and dense backbones), a stride-2 patch embedding of
an odd-sized map drops its last row / column (a 280 px input gives 70, 35, 17, 8 token grids). When a stage's grid
differs from its construction grid, its position embedding is resized
bilinearly (align_corners=False, as the official ``_get_pos_embed``; the official code compares only the token count
for stage 1, vitzoo compares the grid) and the agent row/column biases are linearly resized by
:class:`~vitzoo.layers.agent_attention.AgentAttention`. The agent count does not change. Checkpoints loaded into a
model built at another ``img_size`` get the same resizing applied to the stored tensors.

Beyond the original: any input resolution, fused attention (SDPA) in both attention types, ``features_only``, grad
checkpointing. Written for vitzoo.
"""
import logging
import math
import re
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.jit import Final

from timm.layers import to_2tuple, trunc_normal_, use_fused_attn
from timm.models import checkpoint, generate_default_cfgs, register_model

from vitzoo.layers.agent_attention import AgentAttention
from vitzoo.layers.attention import MultiHeadAttention
from vitzoo.layers.sdpa import use_sdpa
from ._base import default_layers
from ._blocks import PreNormBlock
from ._builder import build_model_with_cfg
from ._helpers import finish_state_dict, sizes_match, unwrap_state_dict
from ._hierarchical import HierarchicalShell, agent_cfg, stage_build_kwargs
from ._manifest import manifest_cfg

__all__ = ['AgentPVT', 'AgentPVTStage']

_logger = logging.getLogger(__name__)



class SpatialReductionAttention(MultiHeadAttention):
    """PVT v1 spatial-reduction attention: softmax attention whose keys / values come from a strided-conv map.

    Args:
        dim: Channels.
        num_heads: Heads.
        qkv_bias: Bias in ``q`` / ``kv``.
        attn_drop: Dropout on the attention map.
        proj_drop: Dropout after ``proj``.
        sr_ratio: Key/value reduction (conv kernel = stride); 1 = plain global attention.
        norm_layer: Norm after the reduction (the official code uses LayerNorm with eps 1e-5 here).
    """
    fused_attn: Final[bool]
    error_prefix = 'SpatialReductionAttention: '

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            sr_ratio: int = 1,
            norm_layer: Callable = nn.LayerNorm,
    ):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
                         fused_attn=use_fused_attn(), separate_q=True)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = norm_layer(dim)
        else:
            self.sr = None
            self.norm = None

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """Attend (B, h*w, C) tokens on the grid ``hw``."""
        B, N, C = x.shape
        q = self._split_q(x)
        if self.sr is not None:
            x = self.sr(x.transpose(1, 2).reshape(B, C, hw[0], hw[1])).flatten(2).transpose(1, 2)
            x = self.norm(x)
        k, v = self._split_kv(x)
        if self.fused_attn and use_sdpa(q, k, v):
            x = self._sdpa(q, k, v)
        else:
            attn = self._logits(q, k)
            # fp32 softmax: the logits of a reduced-precision (autocast) forward can overflow in fp16
            attn = attn.float().softmax(dim=-1).to(v.dtype)
            attn = self.attn_drop(attn)
            x = attn @ v
        return self._project(x)


class Block(PreNormBlock):
    """Pre-norm PVT block with agent attention (``attn_type='A'``) or spatial-reduction attention ('B').

    Called as ``blk(x, hw)`` on (B, h*w, C) tokens of the ``hw`` grid.
    """

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
            attn_type: str = 'A',
            sr_ratio: int = 1,
            agent_num: int = 49,
            window_size: Tuple[int, int] = (56, 56),
    ):
        if attn_type not in ('A', 'B'):
            raise ValueError(f"Block: attn_type must be 'A' (agent) or 'B' (spatial reduction), got {attn_type!r}")
        if attn_type == 'A':
            attn_layer, attn_kwargs = AgentAttention, dict(
                agent_num=agent_num, window_size=window_size, qkv_layout='q_kv', fused_attn=use_fused_attn())
        else:
            attn_layer, attn_kwargs = SpatialReductionAttention, {}
        super().__init__(
            dim, num_heads, attn_layer, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop,
            attn_drop=attn_drop, drop_path=drop_path, act_layer=act_layer, norm_layer=norm_layer, sr_ratio=sr_ratio,
            **attn_kwargs)


class PatchEmbed(nn.Module):
    """Non-overlapping conv patch embedding + LayerNorm (eps 1e-5, as the official), giving (B, h, w, C).

    A trailing partial patch is dropped (floor), as in the official code: stride-2 stages accept odd-sized maps.

    Args:
        in_chs: Input channels.
        dim: Output channels.
        patch_size: Kernel = stride.
        input_size: Input map size at construction (sets ``grid_size``).
    """

    def __init__(self, in_chs: int, dim: int, patch_size: int, input_size: Tuple[int, int]):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = (input_size[0] // patch_size, input_size[1] // patch_size)
        self.proj = nn.Conv2d(in_chs, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class AgentPVTStage(nn.Module):
    """One pyramid stage: patch embedding (conv + LayerNorm eps 1e-5), position embedding, blocks.

    Takes and returns (B, C, H, W) maps.

    Args:
        in_chs: Input channels.
        dim: Stage width.
        input_size: Input map size at construction (image size for stage 0).
        patch_size: Patch (= stride) of the embedding conv.
        depth: Blocks.
        pos_drop: Dropout after adding the position embedding.
        drop_path: Per-block stochastic depth rates.
        **block_kwargs: Passed to every :class:`Block`.
    """

    def __init__(
            self,
            in_chs: int,
            dim: int,
            input_size: Tuple[int, int],
            patch_size: int,
            depth: int,
            pos_drop: float = 0.0,
            drop_path: Sequence[float] = (),
            **block_kwargs,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(in_chs, dim, patch_size, input_size)
        self.grid_size = tuple(self.patch_embed.grid_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], dim))
        self.pos_drop = nn.Dropout(pos_drop)
        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList([
            Block(dim, drop_path=drop_path[j], window_size=self.grid_size, **block_kwargs) for j in range(depth)])
        self.grad_checkpointing = False

    def adapt_state_dict(self, state_dict: Dict[str, torch.Tensor], prefix: str = '') -> None:
        """Resize a checkpoint's position embedding (key under ``prefix``) stored for another grid, in place.

        Bilinear, align_corners=False, as at run time; a table whose grid cannot be told or whose width differs is
        left for the family's key check.
        """
        k = prefix + 'pos_embed'
        v, own = state_dict.get(k), self.pos_embed.shape
        if v is None or v.shape == own or v.ndim != 3 or v.shape[-1] != own[-1]:
            return
        old = _old_grid(v.shape[1], self.grid_size)
        if old is not None:
            _logger.info(f'Resizing {k} from grid {old} to {self.grid_size}')
            pos = v.reshape(1, old[0], old[1], -1).permute(0, 3, 1, 2)
            pos = F.interpolate(pos.float(), size=self.grid_size, mode='bilinear', align_corners=False)
            state_dict[k] = pos.flatten(2).transpose(1, 2).to(v.dtype)

    def _pos_embed(self, hw: Tuple[int, int]) -> torch.Tensor:
        pos = self.pos_embed
        if sizes_match(hw, self.grid_size):
            return pos
        # bilinear, align_corners=False, no antialias: what the official model does at other resolutions
        C = pos.shape[-1]
        pos = pos.reshape(1, self.grid_size[0], self.grid_size[1], C).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=hw, mode='bilinear', align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # B, h, w, C
        B, h, w, C = x.shape
        x = self.pos_drop(x.reshape(B, h * w, C) + self._pos_embed((h, w)))
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, (h, w))
            else:
                x = blk(x, (h, w))
        return x.transpose(1, 2).reshape(B, C, h, w)


class AgentPVT(HierarchicalShell):
    """PVT v1 with agent attention (Agent-PVT). Stages output (B, C, h, w) maps; there is no final norm (``norm`` is
    an Identity).

    Args:
        img_size: Construction resolution (sets the position embeddings and agent bias windows; others run too).
        patch_size: Stage-1 patch size (later stages downsample by 2).
        in_chans: Input channels.
        num_classes: Classifier classes (0 = no head).
        global_pool: 'avg' (mean of the last map, official) or '' (no pooling).
        embed_dims: Width per stage.
        num_heads: Heads per stage.
        mlp_ratios: MLP expansion per stage.
        qkv_bias: Bias in the q / kv projections.
        depths: Blocks per stage.
        sr_ratios: Spatial reduction of 'B' (softmax) stages.
        agent_sr_ratios: Spatial reduction of 'A' (agent) stages, one digit (or int) per stage.
        agent_num: Agents per stage (squares).
        attn_type: One letter per stage, 'A' agent attention or 'B' spatial-reduction attention.
        drop_rate: Dropout before the head.
        pos_drop_rate: Dropout after adding the position embeddings.
        proj_drop_rate: Dropout after projections / MLP (the official ``drop_rate``).
        attn_drop_rate: Attention dropout.
        drop_path_rate: Stochastic depth (linear rule over all blocks).
        norm_layer: Block norm (default LayerNorm eps 1e-6; the patch embeddings keep eps 1e-5).
        act_layer: MLP activation.
    """

    output_fmt = 'NCHW'

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (64, 128, 320, 512),
            num_heads: Sequence[int] = (1, 2, 5, 8),
            mlp_ratios: Sequence[float] = (8, 8, 4, 4),
            qkv_bias: bool = True,
            depths: Sequence[int] = (2, 2, 2, 2),
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
            agent_sr_ratios: Union[str, Sequence[int]] = '1111',
            agent_num: Sequence[int] = (9, 16, 49, 49),
            attn_type: str = 'AAAA',
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_layer: Optional[Callable] = None,
            act_layer: Optional[Callable] = None,
            **kwargs,
    ):
        super().__init__(num_classes, global_pool)
        num_stages = len(depths)
        for name, seq in (('embed_dims', embed_dims), ('num_heads', num_heads), ('mlp_ratios', mlp_ratios),
                          ('sr_ratios', sr_ratios), ('agent_sr_ratios', agent_sr_ratios),
                          ('agent_num', agent_num), ('attn_type', attn_type)):
            if len(seq) < num_stages:
                raise ValueError(f'AgentPVT: {name} needs one entry per stage ({num_stages}), got {seq!r}')
        norm_layer, act_layer = default_layers(norm_layer, act_layer)
        img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.min_size = patch_size * 2 ** (num_stages - 1)
        if img_size[0] % patch_size or img_size[1] % patch_size or min(img_size) < self.min_size:
            raise ValueError(f'AgentPVT: img_size {img_size} must be a multiple of {patch_size} and >= {self.min_size}')
        self.num_features = self.head_hidden_size = embed_dims[num_stages - 1]
        self.attn_type = attn_type[:num_stages]

        dpr = self._drop_path_rates(drop_path_rate, depths)
        stages = []
        in_chs, size, stride = in_chans, img_size, 1
        self.feature_info = []
        for i in range(num_stages):
            p = patch_size if i == 0 else 2
            kind = attn_type[i]
            stages.append(AgentPVTStage(
                in_chs, embed_dims[i], input_size=size, patch_size=p, depth=depths[i], pos_drop=pos_drop_rate,
                drop_path=dpr[i], num_heads=num_heads[i], mlp_ratio=mlp_ratios[i], qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, act_layer=act_layer, norm_layer=norm_layer,
                attn_type=kind, sr_ratio=int(agent_sr_ratios[i]) if kind == 'A' else int(sr_ratios[i]),
                agent_num=int(agent_num[i])))
            in_chs, size, stride = embed_dims[i], stages[-1].grid_size, stride * p
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=stride, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self._init_head(nn.Identity(), drop_rate)

    def init_weights(self) -> None:
        """The official init: trunc_normal(.02) Linear weights and position embeddings, zero biases, unit norms."""
        for stage in self.stages:
            trunc_normal_(stage.pos_embed, std=.02)
        super().init_weights()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r'^stages\.0\.(?:patch_embed|pos_embed)',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^stages\.(\d+)\.(?:patch_embed|pos_embed)', (0,)),
            ])

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return x  # every stage embeds its own input


AgentPvtStage = AgentPVTStage  # deprecated spelling


_OFFICIAL_KEYS = (
    (re.compile(r'^patch_embed(\d+)\.'), lambda m: f'stages.{int(m.group(1)) - 1}.patch_embed.'),
    (re.compile(r'^pos_embed(\d+)$'), lambda m: f'stages.{int(m.group(1)) - 1}.pos_embed'),
    (re.compile(r'^block(\d+)\.(\d+)\.'), lambda m: f'stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.'),
)


def _old_grid(num_tokens: int, new_grid: Tuple[int, int]) -> Optional[Tuple[int, int]]:
    """Grid of a stored position embedding: square (official), else the target's aspect ratio."""
    side = int(round(math.sqrt(num_tokens)))
    if side * side == num_tokens:
        return side, side
    h = int(round(math.sqrt(num_tokens * new_grid[0] / new_grid[1])))
    if h > 0 and num_tokens % h == 0:
        return h, num_tokens // h
    return None


def checkpoint_filter_fn(state_dict: Dict, model: AgentPVT) -> Dict[str, torch.Tensor]:
    """Load an official Agent-PVT checkpoint (``{'model': state_dict}`` with official key names) into ``model``.

    Renames ``patch_embed{i}`` / ``pos_embed{i}`` / ``block{i}.{j}`` to ``stages.{i-1}...`` (vitzoo checkpoints pass
    through), lets the stages and attentions resize their position embeddings and agent row/column biases when the
    model was built at another resolution, then checks every key and shape, raising
    :class:`~vitzoo.models._helpers.CheckpointError` that names the key.
    """
    out = {}
    for k, v in unwrap_state_dict(state_dict).items():
        for pattern, repl in _OFFICIAL_KEYS:
            k, n = pattern.subn(repl, k)
            if n:
                break
        out[k] = v
    return finish_state_dict(out, model)


def _create_agent_pvt(variant: str, pretrained: bool = False, **kwargs) -> AgentPVT:
    return build_model_with_cfg(AgentPVT, variant, pretrained, **stage_build_kwargs(checkpoint_filter_fn, **kwargs))


def _cfg(url: str = '', **kwargs) -> Dict:
    return agent_cfg(url, **{'first_conv': 'stages.0.patch_embed.proj', **kwargs})


default_cfgs = generate_default_cfgs({
    'agent_pvt_tiny.in1k': _cfg(**manifest_cfg('agent_pvt_tiny.in1k')),
    'agent_pvt_small.in1k': _cfg(**manifest_cfg('agent_pvt_small.in1k')),
    'agent_pvt_medium.in1k': _cfg(**manifest_cfg('agent_pvt_medium.in1k')),
    # agent_pvt_m_256.yaml keeps TEST.CROP: Resize((292, 292)) -> CenterCrop(256)
    'agent_pvt_medium_256.in1k': _cfg(
        input_size=(3, 256, 256), pool_size=(8, 8), **manifest_cfg('agent_pvt_medium_256.in1k')),
    'agent_pvt_large.in1k': _cfg(**manifest_cfg('agent_pvt_large.in1k')),
})

_PVT_ARGS = dict(
    patch_size=4, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), qkv_bias=True,
    sr_ratios=(8, 4, 2, 1), agent_sr_ratios='1111', agent_num=(9, 16, 49, 49), attn_type='AAAA')


@register_model
def agent_pvt_tiny(pretrained: bool = False, **kwargs) -> AgentPVT:
    """Agent-PVT-T @ 224, depths 2-2-2-2, agents 9/16/49/49. 11.6M params, 2.0 GFLOPs, 78.4% top-1."""
    model_args = dict(_PVT_ARGS, depths=(2, 2, 2, 2))
    return _create_agent_pvt('agent_pvt_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_small(pretrained: bool = False, **kwargs) -> AgentPVT:
    """Agent-PVT-S @ 224, depths 3-4-6-3. 20.6M params, 4.0 GFLOPs, 82.2% top-1."""
    model_args = dict(_PVT_ARGS, depths=(3, 4, 6, 3))
    return _create_agent_pvt('agent_pvt_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_medium(pretrained: bool = False, **kwargs) -> AgentPVT:
    """Agent-PVT-M @ 224, depths 3-4-18-3. 35.9M params, 7.0 GFLOPs, 83.4% top-1."""
    model_args = dict(_PVT_ARGS, depths=(3, 4, 18, 3))
    return _create_agent_pvt('agent_pvt_medium', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_medium_256(pretrained: bool = False, **kwargs) -> AgentPVT:
    """Agent-PVT-M @ 256 (cfg agent_pvt_m_256). 36.1M params, 9.2 GFLOPs, 83.8% top-1."""
    model_args = dict(_PVT_ARGS, img_size=256, depths=(3, 4, 18, 3))
    return _create_agent_pvt('agent_pvt_medium_256', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_large(pretrained: bool = False, **kwargs) -> AgentPVT:
    """Agent-PVT-L @ 224, depths 3-8-27-3 (official cfg agent_pvt_b). 48.7M params, 10.4 GFLOPs, 83.7% top-1."""
    model_args = dict(_PVT_ARGS, depths=(3, 8, 27, 3))
    return _create_agent_pvt('agent_pvt_large', pretrained=pretrained, **dict(model_args, **kwargs))
