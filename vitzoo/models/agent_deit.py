"""Agent-DeiT

Agent Attention: On the Integration of Softmax and Linear Attention (Han et al., ECCV 2024)
    - https://arxiv.org/abs/2312.08874
Official code: https://github.com/LeapLabTHU/Agent-Attention (``agent_transformer/models/agent_deit.py``).

A DeiT whose first ``agent_layer`` blocks use agent attention (class token via ``ac_bias`` / ``ca_bias``); the rest
are plain softmax blocks. Parameter names follow the official checkpoints, so they load unchanged.

Beyond the original: any input resolution (the position table and the agent row/column biases are resized to the
token grid at run time), fused attention, ``features_only``, grad checkpointing. Written for vitzoo.
"""
import logging
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, DropPath, PatchEmbed, resample_abs_pos_embed, trunc_normal_, use_fused_attn
from timm.models import checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from vitzoo.layers.agent_attention import AgentAttention, resize_bias_1d
from vitzoo.weights import build_model_with_cfg, manifest_cfg
from ._helpers import Mlp, check_state_dict, embed_patches, unwrap_state_dict

__all__ = ['AgentVisionTransformer']

_logger = logging.getLogger(__name__)

_ROW_COL_BIASES = {'ah_bias': 3, 'aw_bias': 4, 'ha_bias': 2, 'wa_bias': 3}  # name -> spatial axis


class Block(nn.Module):
    """Pre-norm transformer block with agent attention (``agent_num > 0``) or plain softmax attention."""

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
            agent_num: int = 0,
            window_size: Tuple[int, int] = (14, 14),
            num_prefix_tokens: int = 1,
    ):
        super().__init__()
        self.is_agent = agent_num > 0
        self.norm1 = norm_layer(dim)
        if self.is_agent:
            self.attn = AgentAttention(
                dim, num_heads=num_heads, agent_num=agent_num, window_size=window_size, qkv_bias=qkv_bias,
                attn_drop=attn_drop, proj_drop=proj_drop, num_prefix_tokens=num_prefix_tokens,
                fused_attn=use_fused_attn())
        else:
            self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.drop_path1(self.attn(y, hw) if self.is_agent else self.attn(y))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


def _agent_nums(agent_num: Union[int, Sequence[int]], agent_layer: int, depth: int) -> List[int]:
    """Per-block agent count (0 = plain block), with the official block -> stage mapping for 4-entry lists."""
    agent_layer = agent_layer if agent_layer > 0 else depth
    if isinstance(agent_num, int):
        nums = [agent_num] * depth
    elif len(agent_num) == depth:
        nums = [int(a) for a in agent_num]
    else:
        stage_of = {0: 0, 1: 1, 2: 2, 3: 2, 4: 2, 5: 3}  # official: agent_num[stage_num[i // 2]]
        nums = [int(agent_num[min(stage_of.get(i // 2, 3), len(agent_num) - 1)]) for i in range(depth)]
    return [n if i < agent_layer else 0 for i, n in enumerate(nums)]


class AgentVisionTransformer(nn.Module):
    """DeiT with agent attention in the first ``agent_layer`` blocks.

    Args:
        img_size: Construction resolution (sets the position table and the agent bias window; others run too).
        patch_size: Patch size.
        in_chans: Input channels.
        num_classes: Classifier classes (0 = no head).
        global_pool: 'token' (class token, default) or 'avg' (mean of patch tokens).
        embed_dim: Width.
        depth: Blocks.
        num_heads: Heads.
        mlp_ratio: MLP expansion.
        qkv_bias: Bias in qkv.
        agent_num: Agents per block: an int, one per block, or the official 4-entry list.
        agent_layer: Number of leading agent blocks (-1 = all, official DeiT-B: 4).
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
            global_pool: str = 'token',
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            agent_num: Union[int, Sequence[int]] = 49,
            agent_layer: int = -1,
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
        if global_pool not in ('token', 'avg', ''):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        act_layer = act_layer or nn.GELU
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False
        self.patch_size = patch_size

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            flatten=False, output_fmt='NHWC', strict_img_size=False)
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1] + 1, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.agent_nums = _agent_nums(agent_num, agent_layer, depth)
        self.blocks = nn.ModuleList([
            Block(
                embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[i], act_layer=act_layer, norm_layer=norm_layer,
                agent_num=self.agent_nums[i], window_size=grid)
            for i in range(depth)])
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """The official (DeiT) init: trunc_normal(.02) for Linear / tokens, unit LayerNorms, agent biases .02."""
        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {'pos_embed', 'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r'^cls_token|pos_embed|patch_embed', blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('token', 'avg', ''):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x, pos, (h, w) = embed_patches(self, x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + pos), (h, w)

    def _run_block(self, blk: nn.Module, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(blk, x, hw)
        return blk(x, hw)

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
        """Features of selected blocks as (B, C, h, w) maps (or (B, N, C) tokens with ``output_fmt='NLC'``).

        Args:
            x: Input images.
            indices: Take the last n blocks if an int, these blocks if a list, all if None.
            return_prefix_tokens: Also return the class token of each selected block.
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
            x = self._run_block(blk, x, (h, w))
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, :self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == 'NCHW':
            intermediates = [y.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks (and optionally norm / head) after the last of ``indices``; returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, hw = self._embed(x)
        for blk in self.blocks:
            x = self._run_block(blk, x, hw)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == 'avg':
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        if self.global_pool == 'token':
            return x[:, 0]
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def checkpoint_filter_fn(state_dict: Dict, model: AgentVisionTransformer) -> Dict[str, torch.Tensor]:
    """Load an official Agent-DeiT checkpoint (``{'model': state_dict}`` with official key names) into ``model``.

    Resizes the position table and the agent row/column biases when the model was built at another resolution, then
    checks every key and shape, raising :class:`~vitzoo.models._helpers.CheckpointError` that names the key.
    """
    state_dict = unwrap_state_dict(state_dict)
    target = model.state_dict()
    out = {}
    grid = model.patch_embed.grid_size
    for k, v in state_dict.items():
        if k == 'pos_embed' and v.shape != target[k].shape:
            old = int(round((v.shape[1] - 1) ** 0.5))
            v = resample_abs_pos_embed(v, new_size=grid, old_size=(old, old), num_prefix_tokens=1, verbose=True)
        elif k.rsplit('.', 1)[-1] in _ROW_COL_BIASES and k in target and v.shape != target[k].shape:
            dim = _ROW_COL_BIASES[k.rsplit('.', 1)[-1]]
            v = resize_bias_1d(v, target[k].shape[dim], dim)
        elif k == 'patch_embed.proj.weight' and v.ndim < 4:
            v = v.reshape(target[k].shape)
        out[k] = v
    check_state_dict(out, model, skip_prefixes=('head.',))
    return out


def _create_agent_deit(variant: str, pretrained: bool = False, **kwargs) -> AgentVisionTransformer:
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        AgentVisionTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict:
    # official eval (agent_transformer/data/build.py build_transform, TEST.CROP True): Resize((s, s)) with
    # s = int(256 / 224 * img), then CenterCrop(img), bicubic == timm's 'squash' mode at crop_pct 0.875
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.875, 'crop_mode': 'squash', 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
        'paper_ids': 'arXiv:2312.08874', 'origin_url': 'https://github.com/LeapLabTHU/Agent-Attention',
        'license': 'apache-2.0', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'agent_deit_tiny.in1k': _cfg(**manifest_cfg('agent_deit_tiny.in1k')),
    'agent_deit_small.in1k': _cfg(**manifest_cfg('agent_deit_small.in1k')),
    # agent_deit_s_448.yaml keeps TEST.CROP: Resize((512, 512)) -> CenterCrop(448)
    'agent_deit_small_448.in1k': _cfg(input_size=(3, 448, 448), **manifest_cfg('agent_deit_small_448.in1k')),
    'agent_deit_base.in1k': _cfg(**manifest_cfg('agent_deit_base.in1k')),
})


@register_model
def agent_deit_tiny(pretrained: bool = False, **kwargs) -> AgentVisionTransformer:
    """Agent-DeiT-T @ 224: 12 agent blocks, 49 agents. 6.0M params, 1.2 GFLOPs, 74.9% top-1."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, agent_num=49, agent_layer=-1)
    return _create_agent_deit('agent_deit_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_small(pretrained: bool = False, **kwargs) -> AgentVisionTransformer:
    """Agent-DeiT-S @ 224: 12 agent blocks, 49 agents. 22.7M params, 4.4 GFLOPs, 80.5% top-1."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, agent_num=49, agent_layer=-1)
    return _create_agent_deit('agent_deit_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_small_448(pretrained: bool = False, **kwargs) -> AgentVisionTransformer:
    """Agent-DeiT-S @ 448 (window 28). 23.1M params, 17.7 GFLOPs, 83.1% top-1."""
    model_args = dict(img_size=448, patch_size=16, embed_dim=384, depth=12, num_heads=6, agent_num=49, agent_layer=-1)
    return _create_agent_deit('agent_deit_small_448', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_base(pretrained: bool = False, **kwargs) -> AgentVisionTransformer:
    """Agent-DeiT-B @ 224: 81 agents in blocks 0-3, softmax attention after. 87.2M params, 17.6 GFLOPs, 82.0%."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, agent_num=81, agent_layer=4)
    return _create_agent_deit('agent_deit_base', pretrained=pretrained, **dict(model_args, **kwargs))
