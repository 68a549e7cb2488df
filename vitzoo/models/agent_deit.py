"""Agent-DeiT

Agent Attention: On the Integration of Softmax and Linear Attention (Han et al., ECCV 2024)
    - https://arxiv.org/abs/2312.08874
Official code: https://github.com/LeapLabTHU/Agent-Attention (``agent_transformer/models/agent_deit.py``).

A DeiT whose first ``agent_layer`` blocks use agent attention (class token via ``ac_bias`` / ``ca_bias``); the rest
are plain softmax blocks. Parameter names follow the official checkpoints, so they load unchanged.

Beyond the original: any input resolution (the position table and the agent row/column biases are resized to the
token grid at run time), fused attention, ``features_only``, grad checkpointing. Written for vitzoo.
"""
from functools import partial
from typing import Dict, List, Sequence, Tuple, Union

import torch

from timm.layers import Attention, use_fused_attn
from timm.models import generate_default_cfgs, register_model

from vitzoo.layers.agent_attention import AgentAttention
from ._blocks import PreNormBlock
from ._builder import build_model_with_cfg
from ._helpers import finish_state_dict, unwrap_state_dict
from ._manifest import manifest_cfg
from ._vit import DeiTShell, adapt_embeddings, deit_build_kwargs, deit_cfg

__all__ = ['AgentVisionTransformer']


class Block(PreNormBlock):
    """Pre-norm transformer block with agent attention (``agent_num > 0``) or plain softmax attention.

    ``kwargs``: the other arguments of :class:`~vitzoo.models._vit.PreNormBlock` (``mlp_ratio``, ``qkv_bias``, ...).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            agent_num: int = 0,
            window_size: Tuple[int, int] = (14, 14),
            num_prefix_tokens: int = 1,
            **kwargs,
    ):
        if agent_num > 0:
            super().__init__(
                dim, num_heads, AgentAttention, agent_num=agent_num, window_size=window_size,
                num_prefix_tokens=num_prefix_tokens, fused_attn=use_fused_attn(), **kwargs)
        else:
            super().__init__(dim, num_heads, Attention, **kwargs)
        self.is_agent = agent_num > 0

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        return super().forward(x, hw) if self.is_agent else super().forward(x)


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


class AgentVisionTransformer(DeiTShell):
    """DeiT with agent attention in the first ``agent_layer`` blocks.

    Args:
        depth: Blocks.
        agent_num: Agents per block: an int, one per block, or the official 4-entry list.
        agent_layer: Number of leading agent blocks (-1 = all, official DeiT-B: 4).
        kwargs: The ViT arguments of :class:`~vitzoo.models._vit.DeiTShell` (``img_size`` sets the position table
            and the agent bias window; other resolutions run too), e.g. ``embed_dim``, ``num_heads``,
            ``global_pool`` ('token' or 'avg'), ``drop_path_rate``.
    """

    def __init__(
            self,
            *,
            depth: int = 12,
            agent_num: Union[int, Sequence[int]] = 49,
            agent_layer: int = -1,
            **kwargs,
    ):
        agent_nums = _agent_nums(agent_num, agent_layer, depth)

        def block_fn(i: int, grid_size: Tuple[int, int], **block_args) -> Block:
            return Block(**block_args, agent_num=agent_nums[i], window_size=grid_size)

        super().__init__(block_fn, depth=depth, **kwargs)
        self.agent_nums = agent_nums


def checkpoint_filter_fn(state_dict: Dict, model: AgentVisionTransformer) -> Dict[str, torch.Tensor]:
    """Load an official Agent-DeiT checkpoint (``{'model': state_dict}`` with official key names) into ``model``.

    Resizes the position table and the agent row/column biases when the model was built at another resolution, then
    checks every key and shape, raising :class:`~vitzoo.models._helpers.CheckpointError` that names the key.
    """
    return finish_state_dict(adapt_embeddings(unwrap_state_dict(state_dict), model), model)


def _create_agent_deit(variant: str, pretrained: bool = False, **kwargs) -> AgentVisionTransformer:
    return build_model_with_cfg(
        AgentVisionTransformer, variant, pretrained, **deit_build_kwargs(checkpoint_filter_fn, **kwargs))


# official eval (agent_transformer/data/build.py build_transform, TEST.CROP True): Resize((s, s)) with
# s = int(256 / 224 * img), then CenterCrop(img), bicubic == timm's 'squash' mode at crop_pct 0.875
_cfg = partial(
    deit_cfg, crop_mode='squash', interpolation='bicubic', paper_ids='arXiv:2312.08874',
    origin_url='https://github.com/LeapLabTHU/Agent-Attention', license='apache-2.0')


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
