"""The DeiT-style ViT shell shared by the vitzoo families built on DeiT (Agent-DeiT, SAT, Sparsifiner).

:class:`DeiTShell` holds what those models have in common: patch embedding at any resolution, class token and
position table, timm's interface (``no_weight_decay``, ``group_matcher``, ``forward_intermediates``; the rest from
:class:`~vitzoo.models._base.ModelInterfaceMixin`), pooling / head and the DeiT init. A family subclasses it
and overrides only its hooks: how a block is built (``block_fn``) and run (:meth:`DeiTShell._run_block`, with the
per-call :class:`BlockState`, as timm's ``eva.py`` passes ``rope`` to its blocks), what happens between blocks
(token pruning), the token layout and the head. One block loop (:meth:`DeiTShell._forward_tokens`) serves
``forward_features``, ``forward_intermediates`` and the families' extra forwards.

:class:`PreNormBlock` (from :mod:`._blocks`, importable here too) is the transformer block around any attention;
:func:`adapt_embeddings` is the position half of every family's ``checkpoint_filter_fn``; :func:`deit_build_kwargs`
and :func:`deit_cfg` the shared parts of their ``_create_*`` and pretrained cfgs.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models import checkpoint

from ._base import ModelInterfaceMixin, default_layers
from ._blocks import PreNormBlock
from ._helpers import embed_patches, init_weights_trunc_normal

__all__ = ['BlockState', 'PreNormBlock', 'DeiTShell', 'adapt_embeddings', 'deit_build_kwargs', 'deit_cfg']


@dataclass
class BlockState:
    """Per-call state of the block loop: the patch grid, plus whatever a family's blocks need or report.

    Families extend it (as a dataclass) with their own fields, e.g. SAT's spatial masks or Sparsifiner's token indices.
    """
    hw: Tuple[int, int]


class DeiTShell(ModelInterfaceMixin, nn.Module):
    """A DeiT (class token, absolute position table, blocks, final norm, head) whose blocks a family supplies.

    Hooks a family overrides (only what differs from DeiT):
      - ``block_fn(i, grid_size=..., **block_args)`` builds block ``i`` (constructor argument);
      - :meth:`_run_block` runs one block with the per-call :class:`BlockState` (``state_cls``);
      - :meth:`_after_block` changes the tokens between blocks (e.g. token pruning);
      - :meth:`_make_tokens`, :meth:`_embed`, :meth:`_split_tokens` for extra tokens (order ``[cls, patches, ...]``);
      - :meth:`_make_head`, :meth:`forward_head`, :meth:`_output` and ``global_pools`` for another head.

    Args:
        block_fn: ``block_fn(i, grid_size, dim, num_heads, mlp_ratio, qkv_bias, proj_drop, attn_drop, drop_path,
            act_layer, norm_layer)`` returns block ``i``; ``grid_size`` is the construction patch grid.
        img_size: Construction resolution (sets the position table; other resolutions run too).
        patch_size: Patch size.
        in_chans: Input channels.
        num_classes: Classifier classes (0 = no head).
        global_pool: One of ``global_pools`` (DeiT: 'token' = class token, 'avg' = mean of patch tokens, '').
        embed_dim: Width.
        depth: Blocks.
        num_heads: Heads.
        mlp_ratio: MLP expansion.
        qkv_bias: Bias in qkv.
        drop_rate: Dropout before the head.
        pos_drop_rate: Dropout after adding the position embedding.
        proj_drop_rate: Dropout after projections / MLP.
        attn_drop_rate: Attention dropout.
        drop_path_rate: Stochastic depth (linear rule).
        norm_layer: Norm (default LayerNorm eps 1e-6).
        act_layer: MLP activation (default GELU).
    """

    global_pools: Tuple[str, ...] = ('token', 'avg', '')
    state_cls: Type[BlockState] = BlockState

    def __init__(
            self,
            block_fn: Callable[..., nn.Module],
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
        self._init_interface(num_classes, global_pool)
        norm_layer, act_layer = default_layers(norm_layer, act_layer)
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.patch_size = patch_size

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            flatten=False, output_fmt='NHWC', strict_img_size=False)
        grid = self.patch_embed.grid_size
        self._make_tokens(embed_dim, grid[0] * grid[1])
        self.pos_drop = nn.Dropout(pos_drop_rate)

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device='cpu')]
        self.blocks = nn.ModuleList([
            block_fn(
                i, grid_size=grid, dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], act_layer=act_layer,
                norm_layer=norm_layer)
            for i in range(depth)])
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self._init_head(norm_layer(embed_dim), drop_rate)
        self.init_weights()

    # ---- construction hooks ---------------------------------------------------------------------------------------

    def _make_tokens(self, embed_dim: int, num_patches: int) -> None:
        """Register the learned tokens and position tables (the shell's own parameters), in checkpoint order."""
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))

    def _token_names(self) -> List[str]:
        return [n for n, _ in self.named_parameters(recurse=False)]

    def init_weights(self) -> None:
        """The official (DeiT) init: trunc_normal(.02) for Linear and the tokens / position tables, unit LayerNorms."""
        # position tables first, then the tokens: the official codes' order of the random draws
        for name in sorted(self._token_names(), key=lambda n: not n.endswith('_embed')):
            trunc_normal_(getattr(self, name), std=.02)
        self.apply(init_weights_trunc_normal)

    # ---- timm interface -------------------------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return set(self._token_names())

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        stem = '|'.join(self._token_names() + ['patch_embed'])
        return dict(stem=f'^{stem}', blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])

    # ---- the block loop -------------------------------------------------------------------------------------------

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Images -> tokens ``[cls, patches]`` with positions added, and the patch grid (h, w)."""
        x, pos, hw = embed_patches(self, x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + pos), hw

    def _checkpointed(self, blk: nn.Module, *args: Any) -> Any:
        """``blk(*args)``, through activation checkpointing when it is on."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(blk, *args)
        return blk(*args)

    def _run_block(self, i: int, blk: nn.Module, x: torch.Tensor, state: BlockState) -> torch.Tensor:
        """Run block ``i`` (default: ``blk(x, hw)``); a family passes its per-call state and keeps side outputs."""
        return self._checkpointed(blk, x, state.hw)

    def _after_block(self, i: int, x: torch.Tensor, state: BlockState) -> torch.Tensor:
        """Tokens after block ``i`` has been run and its output taken as an intermediate (default: unchanged)."""
        return x

    def _split_tokens(self, x: torch.Tensor, state: BlockState) -> Tuple[torch.Tensor, torch.Tensor]:
        """(patch tokens (B, h*w, C) in grid order, the other tokens (B, P, C)) of a block's output."""
        return x[:, self.num_prefix_tokens:], x[:, :self.num_prefix_tokens]

    @staticmethod
    def _to_map(x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """(B, h*w, C) patch tokens -> (B, C, h, w) map."""
        return x.reshape(x.shape[0], hw[0], hw[1], -1).permute(0, 3, 1, 2).contiguous()

    def _forward_tokens(
            self,
            x: torch.Tensor,
            take_indices: Sequence[int] = (),
            norm: bool = False,
            stop_index: Optional[int] = None,
            **state_args: Any,
    ) -> Tuple[torch.Tensor, BlockState, List[Tuple[torch.Tensor, torch.Tensor]]]:
        """Embed, run the blocks, apply the final norm: the one block loop of every forward.

        Args:
            x: Input images.
            take_indices: Blocks whose outputs are returned (split by :meth:`_split_tokens`).
            norm: Apply the final norm to those outputs.
            stop_index: Run only the blocks up to this one.
            state_args: Fields of the family's :class:`BlockState` for this call.

        Returns:
            ``(final-normed tokens, the call's state, [(patches, other tokens) of each taken block])``.
        """
        x, hw = self._embed(x)
        state = self.state_cls(hw, **state_args)
        blocks = self.blocks if stop_index is None else self.blocks[:stop_index + 1]
        taken = []
        for i, blk in enumerate(blocks):
            x = self._run_block(i, blk, x, state)
            if i in take_indices:
                taken.append(self._split_tokens(self.norm(x) if norm else x, state))
            x = self._after_block(i, x, state)
        return self.norm(x), state, taken

    def _output(self, x: torch.Tensor, state: BlockState) -> torch.Tensor:
        """What ``forward_features`` returns from the final-normed tokens (DeiT: the tokens themselves)."""
        return x

    # ---- forward --------------------------------------------------------------------------------------------------

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
        """Patch features of selected blocks as (B, C, h, w) maps (or (B, h*w, C) tokens with ``output_fmt='NLC'``).

        The final output (first element unless ``intermediates_only``) equals :meth:`forward_features`.

        Args:
            x: Input images.
            indices: Take the last n blocks if an int, these blocks if a list, all if None.
            return_prefix_tokens: Also return the non-patch tokens (class token, ...) of each selected block.
            norm: Apply the final norm to each intermediate.
            stop_early: Stop after the last selected block.
            output_fmt: 'NCHW' or 'NLC'.
            intermediates_only: Return only the intermediates.
        """
        take_indices, stop_index = self._take_indices(indices, stop_early, output_fmt)
        x, state, taken = self._forward_tokens(x, take_indices, norm, stop_index)
        intermediates = [patches for patches, _ in taken]
        if output_fmt == 'NCHW':
            intermediates = [self._to_map(y, state.hw) for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, [prefix for _, prefix in taken]))
        if intermediates_only:
            return intermediates
        return self._output(x, state), intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, state, _ = self._forward_tokens(x)
        return self._output(x, state)

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


def adapt_embeddings(state_dict: Dict[str, torch.Tensor], model: DeiTShell) -> Dict[str, torch.Tensor]:
    """The position half of a DeiT-family checkpoint filter, in place on the (renamed) ``state_dict``.

    ``pos_embed`` trained on another (square) grid is resampled to the model's construction grid (timm's bicubic
    ``resample_abs_pos_embed``, prefix rows kept); a flattened (C, in*p*p) ``patch_embed.proj.weight`` is reshaped to
    the conv's weight shape.

    Returns:
        ``state_dict``.
    """
    npt = model.num_prefix_tokens
    pos = state_dict.get('pos_embed')
    if pos is not None and pos.shape != model.pos_embed.shape:
        old = int(round((pos.shape[1] - npt) ** 0.5))
        state_dict['pos_embed'] = resample_abs_pos_embed(
            pos, new_size=model.patch_embed.grid_size, old_size=(old, old), num_prefix_tokens=npt, verbose=True)
    proj = state_dict.get('patch_embed.proj.weight')
    if proj is not None and proj.ndim < 4:
        state_dict['patch_embed.proj.weight'] = proj.reshape(model.patch_embed.proj.weight.shape)
    return state_dict


def deit_build_kwargs(pretrained_filter_fn: Callable, out_indices: int = 3, **kwargs) -> Dict[str, Any]:
    """``build_model_with_cfg`` arguments of a DeiT family: its checkpoint filter, ``features_only`` through
    ``forward_intermediates`` (timm's 'getter', last ``out_indices`` blocks), and the entrypoint's ``kwargs``."""
    return dict(pretrained_filter_fn=pretrained_filter_fn,
                feature_cfg=dict(out_indices=out_indices, feature_cls='getter'), **kwargs)


def deit_cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    """Pretrained cfg of a DeiT-family model: ImageNet-1k at 224, any input size; ``kwargs`` add or override fields."""
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None, 'crop_pct': 0.875,
        'fixed_input_size': False, 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head', **kwargs,
    }
