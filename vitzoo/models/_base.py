"""timm's model interface, shared by the vitzoo shells (DeiT, TAP and pyramid families).

:class:`ModelInterfaceMixin` holds the parts of timm's per-model interface that do not depend on the architecture:
classifier access and reset (with the ``global_pool`` check), grad checkpointing, the ``forward_intermediates``
argument check and ``prune_intermediate_layers``. A shell names its trunk (``trunk_name``: the blocks or stages that
``indices`` count), the intermediate layouts it returns (``intermediate_fmts``) and its poolings (``global_pools``).
"""
from functools import partial
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models._features import feature_take_indices

from vitzoo.layers.linear import Linear

__all__ = ['ModelInterfaceMixin', 'default_layers']


def default_layers(
        norm_layer: Optional[Callable],
        act_layer: Optional[Callable],
        norm_eps: Optional[float] = 1e-6,
) -> Tuple[Callable, Callable]:
    """A model's norm and activation, defaulting to LayerNorm (eps ``norm_eps``; None: PyTorch's 1e-5) and GELU."""
    if norm_layer is None:
        norm_layer = nn.LayerNorm if norm_eps is None else partial(nn.LayerNorm, eps=norm_eps)
    return norm_layer, act_layer or nn.GELU


class ModelInterfaceMixin:
    """timm's classifier / checkpointing / intermediates interface for an ``nn.Module`` with a ``head``.

    The model sets ``num_classes``, ``global_pool``, ``num_features``, ``grad_checkpointing``, ``norm`` and ``head``;
    ``trunk_name`` names its ``nn.ModuleList`` / ``nn.Sequential`` of blocks (or stages).
    """

    global_pools: Tuple[str, ...] = ('avg', '')
    intermediate_fmts: Tuple[str, str] = ('NCHW', 'NLC')
    trunk_name: str = 'blocks'

    def _init_interface(self, num_classes: int, global_pool: str) -> None:
        """Check ``global_pool`` and set the interface's attributes: the start of a model's ``__init__``."""
        self._check_global_pool(global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.grad_checkpointing = False

    def _init_head(self, norm: nn.Module, drop_rate: float) -> None:
        """Register the final ``norm``, ``head_drop`` and ``head`` (after the trunk: checkpoint order)."""
        self.norm = norm
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._make_head(self.num_classes)

    def _check_global_pool(self, global_pool: str) -> None:
        if global_pool not in self.global_pools:
            names = ', '.join(repr(p) for p in self.global_pools[:-1]) + f' or {self.global_pools[-1]!r}'
            raise ValueError(f'global_pool must be {names}, got {global_pool!r}')

    def _make_head(self, num_classes: int) -> nn.Module:
        return Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _trunk(self) -> Union[nn.ModuleList, nn.Sequential]:
        return getattr(self, self.trunk_name)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self._check_global_pool(global_pool)
            self.global_pool = global_pool
        self.head = self._make_head(num_classes)

    def _take_indices(
            self,
            indices: Optional[Union[int, List[int]]],
            stop_early: bool,
            output_fmt: str,
    ) -> Tuple[List[int], Optional[int]]:
        """``forward_intermediates``' argument check: (trunk indices to take, last one to run or None for all)."""
        if output_fmt not in self.intermediate_fmts:
            a, b = self.intermediate_fmts
            raise ValueError(f'output_fmt must be {a!r} or {b!r}, got {output_fmt!r}')
        take_indices, max_index = feature_take_indices(len(self._trunk()), indices)
        return take_indices, max_index if stop_early else None

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Outputs of selected blocks (or stages) as (B, C, h, w) maps, or in the shell's other layout.

        The final output (first element unless ``intermediates_only``) equals ``forward_features``. The shell supplies
        ``_intermediates(x, take_indices, norm, stop_index, output_fmt, intermediates_only)`` -> (final features, or
        None when only the intermediates are asked for and it skips them; the taken outputs in ``output_fmt``).

        Args:
            x: Input images.
            indices: Take the last n blocks / stages if an int, these if a list, all if None.
            norm: Apply the final norm to each intermediate of the final width.
            stop_early: Stop after the last selected block / stage.
            output_fmt: 'NCHW' or the shell's other layout (``intermediate_fmts``).
            intermediates_only: Return only the intermediates.
        """
        take_indices, stop_index = self._take_indices(indices, stop_early, output_fmt)
        x, intermediates = self._intermediates(x, take_indices, norm, stop_index, output_fmt, intermediates_only)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the trunk (and optionally norm / head) after the last of ``indices``; returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self._trunk()), indices)
        setattr(self, self.trunk_name, self._trunk()[:max_index + 1])
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices
