"""Shared shell of the TAP families (FAN, RVT): one block loop, attention maps for ADL, the timm interface."""
import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import checkpoint

from ._base import ModelInterfaceMixin

__all__ = ['TapTransformer', 'tap_build_kwargs', 'tap_cfg']

Grid = Tuple[int, int]


class TapTransformer(ModelInterfaceMixin, nn.Module):
    """Base of :class:`~vitzoo.models.fan.FAN` and :class:`~vitzoo.models.rvt.RVT`.

    Blocks are called ``blk(x, hw, return_attn) -> (x, attn)`` on (B, N, C) tokens of the ``hw`` grid. Subclasses
    call ``super().__init__(num_classes, global_pool, num_prefix_tokens, num_scales)``, build ``blocks``, set
    ``num_features``, register the final norm and head with ``_init_head`` and implement ``_embed`` (images ->
    tokens, grid); ``forward_head`` pools the class token ('token') or the other tokens ('avg'); the hooks
    ``_block_grid`` (grid of a block's output), ``_after_block`` (a transition between blocks) and ``_final`` (last
    block's tokens -> ``forward_features`` output) default to nothing.

    Attention maps for ADL (:mod:`vitzoo.losses.adl`): ``model(x, return_attn=True)`` returns ``(logits, attn)``, one
    post-softmax (B, heads, N, N) map per block. Inside ``with model.record_attention():`` every forward (also
    ``forward_intermediates``) keeps the map of each block it runs, for :meth:`pop_attention`. Only then is the
    attention materialised; otherwise the blocks may use fused attention.
    """

    def __init__(self, num_classes: int, global_pool: str, num_prefix_tokens: int, num_scales: int):
        super().__init__()
        self._init_interface(num_classes, global_pool)
        self.num_prefix_tokens = num_prefix_tokens
        self.num_scales = num_scales
        self._recording = False
        self._recorded: Optional[List[torch.Tensor]] = None

    # subclass hooks (``_embed`` has no default: every family embeds its own way)
    def _block_grid(self, blk: nn.Module, hw: Grid) -> Grid:
        return hw

    def _after_block(self, index: int, x: torch.Tensor, hw: Grid) -> Tuple[torch.Tensor, Grid]:
        return x, hw

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool (class token, or the mean of the other tokens), dropout, classifier."""
        if self.global_pool == 'token':
            x = x[:, 0]
        elif self.global_pool == 'avg':
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    # attention recording
    @contextlib.contextmanager
    def record_attention(self) -> Iterator[None]:
        """While active, each forward keeps every block's attention map for :meth:`pop_attention`."""
        previous, self._recording = self._recording, True
        try:
            yield
        finally:
            self._recording = previous

    @property
    def recording_attention(self) -> bool:
        """True inside :meth:`record_attention`."""
        return self._recording

    def pop_attention(self) -> List[torch.Tensor]:
        """The attention maps (one (B, heads, N, N) per block run) of the last recorded forward; clears them."""
        attn, self._recorded = self._recorded, None
        if attn is None:
            raise RuntimeError(f'{type(self).__name__}.pop_attention: no forward ran inside record_attention()')
        return attn

    # the one block loop
    def _run_blocks(
            self,
            x: torch.Tensor,
            hw: Grid,
            return_attn: bool = False,
            take_indices: Sequence[int] = (),
            last: Optional[int] = None,
    ) -> Tuple[torch.Tensor, Grid, List[Tuple[torch.Tensor, Grid]], List[torch.Tensor]]:
        """Run blocks 0..``last`` (default all): final tokens and grid, the (tokens, grid) after each block in
        ``take_indices``, and each block's attention map (with ``return_attn`` or while recording)."""
        record = return_attn or self._recording
        attns, taken = [], []
        last = len(self.blocks) - 1 if last is None else last
        for i, blk in enumerate(self.blocks[:last + 1]):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x, attn = checkpoint(blk, x, hw, record)
            else:
                x, attn = blk(x, hw, record)
            hw = self._block_grid(blk, hw)
            if record:
                attns.append(attn)
            if i in take_indices:
                taken.append((x, hw))
            x, hw = self._after_block(i, x, hw)
        if self._recording:
            self._recorded = attns
        return x, hw, taken, attns

    def _format(self, y: torch.Tensor, hw: Grid, norm: bool, output_fmt: str) -> torch.Tensor:
        """Tokens as an intermediate: the final norm if asked (and of the final width), (B, C, h, w) for 'NCHW'."""
        if norm and y.shape[-1] == self.num_features:
            y = self.norm(y)
        if output_fmt == 'NCHW':
            y = y.transpose(1, 2).reshape(y.shape[0], -1, hw[0], hw[1])
        return y

    # timm interface
    def _intermediates(self, x: torch.Tensor, take_indices: List[int], norm: bool, stop_index: Optional[int],
                       output_fmt: str, intermediates_only: bool) -> Tuple[Optional[torch.Tensor], List[torch.Tensor]]:
        # block outputs (B, C, h, w), or (B, N, C) tokens with output_fmt='NLC'
        x, hw = self._embed(x)
        x, hw, taken, _ = self._run_blocks(x, hw, take_indices=take_indices, last=stop_index)
        intermediates = [self._format(y, grid, norm, output_fmt) for y, grid in taken]
        # no _final (FAN: the class-attention blocks) when only the intermediates are returned
        return (None if intermediates_only else self._final(x)), intermediates

    def forward_features(self, x: torch.Tensor, return_attn: bool = False):
        """``forward_features`` output (family specific); with ``return_attn`` also the list of block maps."""
        x, hw = self._embed(x)
        x, _, _, attns = self._run_blocks(x, hw, return_attn)
        x = self._final(x)
        return (x, attns) if return_attn else x

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        """Logits; with ``return_attn=True`` ``(logits, attn)``, attn = one (B, heads, N, N) map per block."""
        if return_attn:
            x, attns = self.forward_features(x, return_attn=True)
            return self.forward_head(x), attns
        return self.forward_head(self.forward_features(x))


def tap_build_kwargs(pretrained_filter_fn: Callable, out_indices: int = 3, **kwargs) -> Dict[str, Any]:
    """``build_model_with_cfg`` arguments of a TAP family: its checkpoint filter, ``features_only`` through
    ``forward_intermediates`` (timm's 'getter', last ``out_indices`` blocks), and the entrypoint's ``kwargs``."""
    return dict(pretrained_filter_fn=pretrained_filter_fn,
                feature_cfg=dict(out_indices=out_indices, feature_cls='getter'), **kwargs)


def tap_cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    """Pretrained cfg of a TAP + ADL model (ImageNet-1k at 224, bicubic center crop, any input size); ``kwargs`` add
    the family's ``crop_pct`` / ``first_conv`` or override fields."""
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_mode': 'center', 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD, 'classifier': 'head',
        'paper_ids': 'arXiv:2303.11126', 'origin_url': 'https://github.com/guoyongcs/TAPADL',
        'license': 'other', **kwargs,
    }
