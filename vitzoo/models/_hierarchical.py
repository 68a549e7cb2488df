"""The timm shell shared by the four-stage (pyramid) agent families: Agent-PVT, Agent-Swin and Agent-CSwin.

:class:`HierarchicalShell` holds what those models have in common around their stages: timm's interface
(``group_matcher``, grad checkpointing, classifier access, ``forward_intermediates`` / ``prune_intermediate_layers``),
the input check, pooling / head and the official trunc-normal init. One stage loop
(:meth:`HierarchicalShell._forward_stages`) serves ``forward_features`` and ``forward_intermediates``.

A family builds its stem (``patch_embed``, if it has one) and stages in ``__init__`` between
``super().__init__(num_classes, global_pool)`` and :meth:`HierarchicalShell._init_head`, and overrides only what
differs: where the stages live (``trunk_name``: timm's Swin calls them ``layers``), their output layout
(``output_fmt``), :meth:`HierarchicalShell._embed`, :meth:`HierarchicalShell._pool`, ``group_matcher``,
``no_weight_decay`` and ``init_weights``.

:func:`stage_agent_blocks` parses the official ``attn_type`` strings of Agent-Swin / Agent-CSwin;
:func:`stage_build_kwargs` and :func:`agent_cfg` are the shared parts of the families' ``_create_*`` and pretrained
cfgs.
"""
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ._base import ModelInterfaceMixin
from ._helpers import init_weights_trunc_normal

__all__ = ['HierarchicalShell', 'stage_agent_blocks', 'stage_build_kwargs', 'agent_cfg']


def stage_agent_blocks(attn_type: str, depths: Sequence[int]) -> List[int]:
    """Leading agent blocks per stage from an official ``attn_type`` string ('AAAB', 'AABB', 'AAMB2', ...).

    One letter per stage: 'A' every block is an agent block, 'B' none, 'M' the first ``int(attn_type[n:])`` blocks
    (n = number of stages), the rest are the family's other attention.
    """
    n = len(depths)
    letters, suffix = attn_type[:n], attn_type[n:]
    if len(letters) != n or any(c not in 'ABM' for c in letters) or ('M' in letters) != bool(suffix):
        raise ValueError(f"attn_type must be {n} letters of A/B/M (plus the block count after an 'M'), "
                         f'got {attn_type!r}')
    return [d if c == 'A' else 0 if c == 'B' else min(int(suffix), d) for c, d in zip(letters, depths)]


class HierarchicalShell(ModelInterfaceMixin, nn.Module):
    """A pyramid of stages (stem, stages, final norm, pooled linear head) whose stem and stages a family supplies.

    Subclass attributes: ``trunk_name`` (the ``nn.Sequential`` of stages), ``output_fmt`` (layout of the stage
    outputs, 'NHWC' or 'NCHW'), ``stride_name`` (the name of ``patch_size``, which input sides must be multiples of,
    in the error message) and ``min_size`` (smallest input side, 0 = any).

    Args:
        num_classes: Classifier classes (0 = no head).
        global_pool: 'avg' (mean of the last map) or '' (no pooling: ``forward_head`` returns the map).
    """

    trunk_name: str = 'stages'
    intermediate_fmts = ('NCHW', 'NHWC')
    output_fmt: str = 'NHWC'
    stride_name: str = 'patch size'
    min_size: int = 0

    def __init__(self, num_classes: int, global_pool: str):
        super().__init__()
        self._init_interface(num_classes, global_pool)

    @staticmethod
    def _drop_path_rates(drop_path_rate: float, depths: Sequence[int]) -> List[List[float]]:
        """Stochastic depth per block, split per stage (linear rule over all blocks)."""
        rates = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').split(list(depths))
        return [x.tolist() for x in rates]

    def _init_head(self, norm: nn.Module, drop_rate: float) -> None:
        """Register the final ``norm``, ``head_drop`` and ``head`` (after the stages: checkpoint order), then init."""
        super()._init_head(norm, drop_rate)
        self.init_weights()

    def init_weights(self) -> None:
        """The official init: trunc_normal(.02) Linear with zero bias, unit LayerNorms; convs keep PyTorch's default."""
        self.apply(init_weights_trunc_normal)

    # ---- timm interface -------------------------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        # as the official PVT (it decays its position embeddings, listing only a cls_token it does not have) and CSwin
        # (its pos_embed / cls_token do not exist): nothing is excluded
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        s = self.trunk_name
        return dict(
            stem=r'^patch_embed',
            blocks=rf'^{s}\.(\d+)' if coarse else [
                (rf'^{s}\.(\d+)\.downsample', (0,)),
                (rf'^{s}\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        for stage in self._trunk():
            stage.grad_checkpointing = enable

    # ---- the stage loop -------------------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(
                f'{type(self).__name__}: input size {H}x{W} is not a multiple of the {self.stride_name} {p}')
        if self.min_size and min(H, W) < self.min_size:
            raise ValueError(f'{type(self).__name__}: input size {H}x{W} is smaller than {self.min_size}')

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Checked images -> the first stage's input (default: ``patch_embed``)."""
        self._check_input(x)
        return self.patch_embed(x)

    def _to_fmt(self, x: torch.Tensor, output_fmt: str) -> torch.Tensor:
        if output_fmt == self.output_fmt:
            return x
        return x.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else x.permute(0, 2, 3, 1)

    def _forward_stages(
            self,
            x: torch.Tensor,
            take_indices: Sequence[int] = (),
            norm: bool = False,
            stop_index: Optional[int] = None,
            output_fmt: str = 'NCHW',
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Embed, run the stages, apply the final norm: the one stage loop of every forward.

        Args:
            x: Input images.
            take_indices: Stages whose outputs are returned.
            norm: Apply the final norm to the last stage's output if taken (the norm has the last stage's width).
            stop_index: Run only the stages up to this one.
            output_fmt: Layout of the taken outputs, 'NCHW' or 'NHWC'.

        Returns:
            ``(final-normed last map in the stage layout, [taken stage outputs])``.
        """
        stages = self._trunk()
        last = len(stages) - 1
        if stop_index is not None:
            stages = stages[:stop_index + 1]
        x = self._embed(x)
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(self._to_fmt(self.norm(x) if norm and i == last else x, output_fmt))
        return self.norm(x), intermediates

    def _intermediates(self, x: torch.Tensor, take_indices: List[int], norm: bool, stop_index: Optional[int],
                       output_fmt: str, intermediates_only: bool) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        # stage outputs (B, C, h, w), or (B, h, w, C) with output_fmt='NHWC'; only the last stage has the norm's width
        return self._forward_stages(x, take_indices, norm, stop_index, output_fmt)

    # ---- forward --------------------------------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the normalised last-stage map, in the stage layout."""
        return self._forward_stages(x)[0]

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over the map (``global_pool='avg'``)."""
        return x.mean(dim=(1, 2)) if self.output_fmt == 'NHWC' else x.mean(dim=(2, 3))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = self._pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def stage_build_kwargs(
        pretrained_filter_fn: Callable,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        **kwargs,
) -> Dict[str, Any]:
    """``build_model_with_cfg`` arguments of a pyramid family: its checkpoint filter, ``features_only`` through
    ``forward_intermediates`` (timm's 'getter', stages ``out_indices``), and the entrypoint's ``kwargs``."""
    return dict(pretrained_filter_fn=pretrained_filter_fn,
                feature_cfg=dict(out_indices=out_indices, feature_cls='getter'), **kwargs)


def agent_cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    """Pretrained cfg of an official Agent-Attention pyramid model at 224; ``kwargs`` add or override fields."""
    # official eval (agent_transformer/data/build.py build_transform, TEST.CROP True): Resize((s, s)) with
    # s = int(256 / 224 * img), then CenterCrop(img), bicubic == timm's 'squash' mode at crop_pct 0.875
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'crop_mode': 'squash', 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
        'paper_ids': 'arXiv:2312.08874', 'origin_url': 'https://github.com/LeapLabTHU/Agent-Attention',
        'license': 'apache-2.0', **kwargs,
    }
