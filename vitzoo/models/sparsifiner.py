"""Sparsifiner (DeiT backbone)

Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers (Wei et al., CVPR 2023)
    - https://arxiv.org/abs/2303.13755
Official code: https://github.com/lim142857/Sparsifiner (``src/models/sparsifiner.py``), MIT license.

A DeiT whose every block predicts, per image and head, which keys each query attends to (a low-rank "connectivity
predictor", see :mod:`vitzoo.layers.sparse_attention`) and runs softmax attention over the top ⌈ρ·n⌉ of them (the class
token's query row stays dense). Optionally ("attention + token sparsity") class-attention token selection (EViT-style,
no fused token) keeps ``ceil(r^j · patches)`` tokens after the blocks in ``token_pruning_loc`` (official: 3, 6, 9 with
r, r², r³). Parameter names follow the official checkpoints (= timm / DeiT names plus ``attn.mask_predictor.*``), so
official checkpoints load unchanged, and a plain DeiT checkpoint (timm ``deit_*_patch16_224`` or the original DeiT
``{'model': ...}`` files) initialises the backbone with a freshly initialised predictor.

Training is two-phase (see :mod:`vitzoo.losses.sparsifiner` and
:meth:`SparsifinerVisionTransformer.set_training_phase`): phase 1 trains only the predictor on the teacher's attention
with dense attention (``attn_recon=True`` in train mode), phase 2 trains only the backbone with the sparse attention.
``forward`` always returns logits; :meth:`SparsifinerVisionTransformer.forward_dict` returns the logits, final patch
tokens, approximate attentions, masks and (optionally) attention maps the losses need.

"Train mode" for the generic every-parameter-gets-a-gradient contract means the deployed sparse forward with the
straight-through mask gradient (below): the plain ``model(x)`` reaches the predictors of all blocks but the last one
with nonzero gradient (the last block's predictor only shapes patch-token rows, which a class-token head never reads,
so its gradient is zero but present; phase 2's token distillation reads them).

Beyond / fixed relative to the original:
- any input resolution: the position table and the predictor's token-axis projections (tied to 197 tokens in the
  original) are resized to the token grid at run time; the attention budget is ⌈ρ·n⌉ of the actual n;
- speed: no dense -inf matrix + ``nan_to_num`` and no always-computed unmasked softmax; the kept keys are an additive
  bias for fused SDPA. Token pruning physically drops tokens (the original zeroes them and keeps computing them, so it
  saves nothing). Consequence of dropping: the class token no longer attends to pruned tokens (in the original they
  stay in its dense row as zero keys / values with logit 0, diluting its softmax); this is treated as a bug fix;
- the per-call attention budget is not written back into the module (the original's token pruning permanently shrinks
  it);
- gradients: in train mode the predictor receives the task gradient through a straight-through estimator of the hard
  mask (exact outputs, see the layer docstring; ``mask_grad=False`` restores the original's detached mask). This is
  why the plain forward in train mode touches every parameter;
- ``attn_drop_rate`` is applied (the original builds the dropout but never calls it; the default is 0);
- fused attention, grad checkpointing, ``features_only`` (pruned positions are zero in the feature maps, as the
  original zeroes pruned tokens).

The paper's FLOPs are analytic (only kept attention entries plus the predictor); :func:`sparsifiner_flops` counts
them (DeiT-S at ρ=0.25: 4.44 vs 4.60 GMACs, MHSA -43.7%).

Speed (``tools/benchmark.py --suite sparsifiner``: CPU, fp32, eval, batch 8, 224², 1 thread, medians of interleaved
ratios to timm ``deit_small_patch16_224``): 1.55-1.66x (the original's masked-dense attention, emulated on the same
weights in the same run: 2.27x; this model at ``attn_keep_rate=1``: 1.00x); token-sparse (``TOKEN_SPARSE_KWARGS``,
r=0.7): 1.04-1.10x, r=0.5: 0.82-0.86x. Of the sparse model's extra time (~+60% of DeiT-S), the exact per-query
top-⌈ρn⌉ (``torch.topk`` over 9,408 rows of 197 per block at batch 8) is ~36% of DeiT-S by itself, the predictor's
GEMMs ~8%, the bias fill + scatter ~8%, the bias inside SDPA ~3%; the attention products the mask makes prunable are
7.8% of DeiT-S FLOPs. At n = 197 attention sparsity cannot pay for itself in wall clock on CPU (no eager op selects
faster than ``torch.topk``; see :mod:`vitzoo.layers.sparse_attention`); token pruning can.

Written for vitzoo.
"""
import logging
import math
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, PatchEmbed, resample_abs_pos_embed, trunc_normal_, use_fused_attn
from timm.models import checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from vitzoo.layers.sparse_attention import SparseAttention, mask_from_indices, resize_token_projection
from vitzoo.weights import build_model_with_cfg
from ._helpers import CheckpointError, Mlp, check_state_dict, embed_patches, unwrap_state_dict

__all__ = ['SparsifinerVisionTransformer', 'sparsifiner_flops', 'TOKEN_SPARSE_KWARGS']

# The "attention + token sparsity" configuration: the official code's pruning blocks (default_config 3, 6, 9) with the
# DynamicViT / EViT reference keep rate 0.7 (r, r², r³ of the patches). The released yaml runs without token pruning
# and the paper states no keep rate, so this is the reference point for speed comparisons, not a released model.
TOKEN_SPARSE_KWARGS = dict(token_keep_rate=0.7, token_pruning_loc=(3, 6, 9))

_logger = logging.getLogger(__name__)

_PREDICTOR = 'attn.mask_predictor.'
_TOKEN_PROJ = ('proj_n', 'proj_back_n')


class Block(nn.Module):
    """Pre-norm transformer block with Sparsifiner attention."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: Tuple[int, int],
            keep_rate: float = 0.25,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
            drop_path: float = 0.0,
            act_layer: Callable = nn.GELU,
            norm_layer: Callable = nn.LayerNorm,
            **predictor_kwargs,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = SparseAttention(
            dim, num_heads=num_heads, grid_size=grid_size, keep_rate=keep_rate, qkv_bias=qkv_bias,
            attn_drop=attn_drop, proj_drop=proj_drop, fused_attn=use_fused_attn(), **predictor_kwargs)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(
            self,
            x: torch.Tensor,
            grid: Tuple[int, int],
            token_idx: Optional[torch.Tensor] = None,
            return_attn: bool = False,
            need_cls_attn: bool = False,
    ) -> Tuple[torch.Tensor, Dict[str, Optional[torch.Tensor]]]:
        y, aux = self.attn(self.norm1(x), grid, token_idx, return_attn=return_attn, need_cls_attn=need_cls_attn)
        x = x + self.drop_path1(y)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x, aux


def _per_layer(value: Union[float, Sequence[float]], depth: int, name: str) -> List[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * depth
    value = [float(v) for v in value]
    if len(value) != depth:
        raise ValueError(f'{name} has {len(value)} entries, expected one per block ({depth})')
    return value


class SparsifinerVisionTransformer(nn.Module):
    """DeiT with Sparsifiner attention in every block and optional class-attention token pruning.

    Args:
        img_size: Construction resolution (sets the position table and the predictor's token projections).
        patch_size: Patch size.
        in_chans: Input channels.
        num_classes: Classifier classes (0 = no head).
        global_pool: 'token' (class token, default) or 'avg' (mean of the kept patch tokens).
        embed_dim: Width.
        depth: Blocks.
        num_heads: Heads.
        mlp_ratio: MLP expansion.
        qkv_bias: Bias in qkv.
        attn_keep_rate: Attention keep ratio ρ (one float or one per block); 1.0 = dense attention.
        rank: Predictor rank (None: tokens // reduce_n_factor, 32 at 224²).
        reduce_n_factor: Rank divisor (official 6).
        reduce_c_factor: Head-dim divisor of the predictor's q / k projections (official 2).
        basis_topk: Rank coefficients kept per query (official 8).
        basis_threshold: |P_up| entries <= this are zeroed (official 0.02).
        share_inout_proj: Tie ``proj_back_n`` to ``proj_n``.
        token_keep_rate: Token keep rate base r (1.0 = no token pruning); the j-th pruning keeps r^(j+1).
        token_pruning_loc: Blocks after which tokens are pruned (official 3, 6, 9).
        attn_recon: Phase-1 mode: in train mode, dense attention and the signed-basis predictor.
        mask_grad: Straight-through gradient from the sparse attention to the predictor in train mode.
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
            embed_dim: int = 384,
            depth: int = 12,
            num_heads: int = 6,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            attn_keep_rate: Union[float, Sequence[float]] = 0.25,
            rank: Optional[int] = None,
            reduce_n_factor: int = 6,
            reduce_c_factor: int = 2,
            basis_topk: int = 8,
            basis_threshold: float = 0.02,
            share_inout_proj: bool = False,
            token_keep_rate: float = 1.0,
            token_pruning_loc: Sequence[int] = (3, 6, 9),
            attn_recon: bool = False,
            mask_grad: bool = True,
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
        if not 0 < token_keep_rate <= 1:
            raise ValueError(f'token_keep_rate must be in (0, 1], got {token_keep_rate}')
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        act_layer = act_layer or nn.GELU
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False
        self.patch_size = patch_size
        self.token_keep_rate = float(token_keep_rate)
        self.token_pruning_loc = tuple(sorted(int(i) for i in token_pruning_loc if 0 <= int(i) < depth - 1)) \
            if token_keep_rate < 1 else ()

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            flatten=False, output_fmt='NHWC', strict_img_size=False)
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1] + 1, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        keep = _per_layer(attn_keep_rate, depth, 'attn_keep_rate')
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList([
            Block(
                embed_dim, num_heads, grid, keep_rate=keep[i], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], act_layer=act_layer,
                norm_layer=norm_layer, rank=rank, reduce_n_factor=reduce_n_factor, reduce_c_factor=reduce_c_factor,
                basis_topk=basis_topk, basis_threshold=basis_threshold, share_inout_proj=share_inout_proj)
            for i in range(depth)])
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()
        self.attn_recon = attn_recon
        self.mask_grad = mask_grad

    def init_weights(self) -> None:
        """The official (DeiT) init: trunc_normal(.02) for Linear / tokens / token projections, unit LayerNorms."""
        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        self.apply(_init_weights)

    # ---- modes --------------------------------------------------------------------------------------------------

    @property
    def attn_recon(self) -> bool:
        """Phase-1 mode: in train mode, dense attention and the signed-basis predictor (official USE_ATTN_RECON)."""
        return self._attn_recon

    @attn_recon.setter
    def attn_recon(self, value: bool) -> None:
        self._attn_recon = bool(value)
        for blk in self.blocks:
            blk.attn.attn_recon = self._attn_recon

    @property
    def mask_grad(self) -> bool:
        """Straight-through gradient from the sparse attention into the predictor (train mode)."""
        return self._mask_grad

    @mask_grad.setter
    def mask_grad(self, value: bool) -> None:
        self._mask_grad = bool(value)
        for blk in self.blocks:
            blk.attn.mask_grad = self._mask_grad

    @torch.jit.ignore
    def predictor_parameters(self) -> List[nn.Parameter]:
        """The connectivity predictors' parameters (trained in phase 1)."""
        return list({id(p): p for n, p in self.named_parameters() if _PREDICTOR in n}.values())

    @torch.jit.ignore
    def backbone_parameters(self) -> List[nn.Parameter]:
        """Every parameter except the predictors' (trained in phase 2)."""
        return [p for n, p in self.named_parameters() if _PREDICTOR not in n]

    @torch.jit.ignore
    def set_training_phase(self, phase: str) -> None:
        """Configure the official two-phase schedule.

        - ``'attn_recon'`` (phase 1): only the predictor is trainable; train-mode forwards use dense attention.
        - ``'distill'`` (phase 2): only the backbone is trainable; forwards use sparse attention.
        - ``'joint'``: everything trainable, sparse attention (not in the paper's schedule).
        """
        if phase not in ('attn_recon', 'distill', 'joint'):
            raise ValueError(f"phase must be 'attn_recon', 'distill' or 'joint', got {phase!r}")
        self.attn_recon = phase == 'attn_recon'
        for n, p in self.named_parameters():
            is_pred = _PREDICTOR in n
            p.requires_grad_(phase == 'joint' or is_pred == (phase == 'attn_recon'))

    # ---- timm interface -----------------------------------------------------------------------------------------

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

    def _run_block(self, blk: nn.Module, x: torch.Tensor, grid: Tuple[int, int], token_idx: Optional[torch.Tensor],
                   return_attn: bool = False, need_cls_attn: bool = False):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(blk, x, grid, token_idx, return_attn, need_cls_attn)
        return blk(x, grid, token_idx, return_attn, need_cls_attn)

    def _prunes_after(self, i: int) -> Optional[float]:
        """Keep rate of the token pruning after block ``i`` (None: no pruning there, or in phase-1 training)."""
        if i not in self.token_pruning_loc or (self.training and self.attn_recon):
            return None
        return self.token_keep_rate ** (self.token_pruning_loc.index(i) + 1)

    def _prune(self, x: torch.Tensor, cls_attn: torch.Tensor, token_idx: Optional[torch.Tensor], keep_rate: float,
               grid: Tuple[int, int]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Keep the ⌈keep_rate · patches⌉ tokens the class token attends to most (mean over heads), in order."""
        npt = self.num_prefix_tokens
        budget = math.ceil(keep_rate * grid[0] * grid[1])
        n = x.shape[1] - npt
        if budget >= n:
            return x, token_idx
        sel = cls_attn.mean(dim=1).topk(budget, dim=-1, sorted=False)[1].sort(dim=-1)[0]  # B, budget
        patches = torch.gather(x[:, npt:], 1, sel.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :npt], patches], dim=1)
        if token_idx is None:
            token_idx = torch.arange(n, device=x.device).expand(x.shape[0], n)
        return x, torch.gather(token_idx, 1, sel)

    def _forward_blocks(
            self,
            x: torch.Tensor,
            grid: Tuple[int, int],
            blocks: Optional[Sequence[nn.Module]] = None,
            return_attn: bool = False,
            collect: Optional[Callable] = None,
            keep_aux: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], List[Dict]]:
        """Run the blocks with token pruning; returns tokens, final token indices and (``keep_aux``) side outputs."""
        token_idx = None
        auxes = []
        for i, blk in enumerate(self.blocks if blocks is None else blocks):
            keep = self._prunes_after(i)
            x, aux = self._run_block(blk, x, grid, token_idx, return_attn, keep is not None)
            if keep_aux:  # only on request: the approximate attentions are (B, H, n - 1, n) per block
                auxes.append(dict(aux, token_idx=token_idx))
            if collect is not None:
                collect(i, x, token_idx)
            if keep is not None:
                x, token_idx = self._prune(x, aux['cls_attn'], token_idx, keep, grid)
        return x, token_idx, auxes

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
        """Features of selected blocks as (B, C, h, w) maps (or (B, h*w, C) tokens with ``output_fmt='NLC'``).

        Pruned token positions are zero (the original zeroes pruned tokens).

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
        npt = self.num_prefix_tokens
        intermediates, prefix = [], []

        def collect(i, y, token_idx):
            if i not in take_indices:
                return
            y = self.norm(y) if norm else y
            prefix.append(y[:, :npt])
            patches = y[:, npt:]
            if token_idx is not None:  # scatter the kept tokens back onto the grid
                full = patches.new_zeros(B, h * w, patches.shape[-1])
                patches = full.scatter(1, token_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]), patches)
            intermediates.append(patches)

        blocks = self.blocks if not stop_early else self.blocks[:max_index + 1]
        x, _, _ = self._forward_blocks(x, (h, w), blocks, collect=collect)
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
        """Final-normed tokens (B, 1 + kept, C): class token, then the kept patch tokens in grid order."""
        x, grid = self._embed(x)
        x, _, _ = self._forward_blocks(x, grid)
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

    @torch.jit.ignore
    def forward_dict(self, x: torch.Tensor, return_attn: bool = False, return_masks: bool = False) -> Dict:
        """Everything the two training phases and inspection need, in one forward.

        Returns a dict with
          - ``logits`` (B, classes) (the head output, as ``forward``);
          - ``features``: final-normed patch tokens (B, kept, C);
          - ``token_idx``: (B, kept) grid indices of the patch tokens in ``features`` (None without token pruning);
          - ``approx_attn``: per block the predictor's approximate attention (B, H, n - 1, n), None where the
            predictor did not run (dense layers);
          - ``keep_idx``: per block the kept-key indices (B, H, n - 1, k), None for dense attention;
          - ``layer_token_idx``: per block the token indices its input had (None before any pruning);
          - with ``return_masks``: ``masks``, per block the boolean (B, H, n, n) connectivity mask (all True if dense);
          - with ``return_attn``: ``attn``, per block the attention probabilities (B, H, n, n) actually used.
        """
        x, grid = self._embed(x)
        x, token_idx, auxes = self._forward_blocks(x, grid, return_attn=return_attn, keep_aux=True)
        x = self.norm(x)
        out = dict(
            logits=self.forward_head(x), features=x[:, self.num_prefix_tokens:], token_idx=token_idx,
            approx_attn=[a['approx'] for a in auxes], keep_idx=[a['idx'] for a in auxes],
            layer_token_idx=[a['token_idx'] for a in auxes])
        if return_masks:
            masks = []
            heads = self.blocks[0].attn.num_heads
            for a in auxes:
                lt = a['token_idx']
                n = self.num_prefix_tokens + (lt.shape[1] if lt is not None else grid[0] * grid[1])
                masks.append(mask_from_indices(
                    a['idx'], n, self.num_prefix_tokens, shape=(x.shape[0], heads), device=x.device))
            out['masks'] = masks
        if return_attn:
            out['attn'] = [a['attn'] for a in auxes]
        return out


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ---- analytic FLOPs -------------------------------------------------------------------------------------------------


def sparsifiner_flops(
        model: SparsifinerVisionTransformer,
        input_size: Tuple[int, ...] = (3, 224, 224),
        count_basis_sparsity: bool = False,
) -> Dict[str, float]:
    """Analytic multiply-accumulates (the papers' "FLOPs") of one eval forward at ``input_size``, batch 1.

    The paper's accounting: attention counts only the kept entries (QKᵀ and AV over ⌈ρn⌉ keys per predicted query
    row plus the dense class-token row), plus the predictor (q / k width reduction, token down-projection, low-rank
    scores, and the up-projection over the top-``basis_topk`` coefficients). Linear layers, patch embedding and head
    are counted as ``torch.utils.flop_counter`` counts them (no bias, norm, softmax or top-k terms), so that at
    ``attn_keep_rate=1`` the total equals the dense DeiT's ``vitzoo.utils.count_macs``. Token pruning shrinks n after
    the pruning blocks.

    Args:
        model: A Sparsifiner model.
        input_size: (C, H, W).
        count_basis_sparsity: Count the up-projection only over the nonzero entries of the thresholded basis
            (weight dependent) instead of dense basis rows.

    Returns:
        Dict of MAC counts ``total``, ``attention`` (kept QKᵀ + AV), ``predictor``, ``dense_attention`` (QKᵀ + AV if
        dense, at the same token counts) and ``other`` (patch embedding, linears, head), plus ``mhsa_reduction``
        = 1 - (attention + predictor) / dense_attention (a fraction; 0.437 for DeiT-S at ρ=0.25).
    """
    C, H, W = input_size
    p = model.patch_size
    h, w = H // p, W // p
    npt = model.num_prefix_tokens
    dim = model.embed_dim
    patches = h * w
    n = npt + patches
    other = patches * dim * C * p * p  # patch embedding conv
    attention = predictor = dense_attention = 0
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        heads, d = attn.num_heads, attn.head_dim
        hidden = blk.mlp.fc1.out_features
        other += n * dim * 3 * dim + n * dim * dim + 2 * n * dim * hidden  # qkv, proj, mlp
        dense_attention += 2 * heads * n * n * d
        budget = attn.budget((h, w), n)
        if budget >= n:
            attention += 2 * heads * n * n * d
        else:
            nnz = npt * n + (n - npt) * budget
            attention += 2 * heads * nnz * d
            pred = attn.mask_predictor
            c, r = pred.reduced_c, pred.rank
            up = pred.basis_topk * n
            if count_basis_sparsity:
                with torch.no_grad():
                    basis = pred.token_projections((h, w))[1]
                    up = pred.basis_topk * n * float((basis.abs() > pred.basis_threshold).float().mean())
            predictor += heads * (
                (n - npt) * d * c  # q width reduction (predicted rows only)
                + n * d * c  # k width reduction
                + c * n * r  # token down-projection of k
                + (n - npt) * c * r  # low-rank scores
                + (n - npt) * int(round(up)))  # up-projection over the kept coefficients
        keep = model.token_keep_rate ** (model.token_pruning_loc.index(i) + 1) \
            if i in model.token_pruning_loc else None
        if keep is not None:
            n = npt + min(n - npt, math.ceil(keep * patches))
    other += dim * model.num_classes if model.num_classes > 0 else 0
    total = other + attention + predictor
    reduction = 1 - (attention + predictor) / dense_attention if dense_attention else 0.
    return dict(total=int(total), attention=int(attention), predictor=int(predictor),
                dense_attention=int(dense_attention), other=int(other), mhsa_reduction=float(reduction))


# ---- checkpoints ----------------------------------------------------------------------------------------------------


def checkpoint_filter_fn(state_dict: Dict, model: SparsifinerVisionTransformer) -> Dict[str, torch.Tensor]:
    """Load an official Sparsifiner checkpoint, or a plain DeiT one (predictor kept at its fresh init).

    Accepts ``{'model': ...}`` / ``'state_dict'`` / EMA nesting and ``module.`` prefixes. Resizes the position table and
    the predictor's token projections when the model was built at another resolution, fills in the whole predictor
    from ``model`` when the checkpoint has none (a DeiT checkpoint), then checks every key and shape, raising
    :class:`~vitzoo.models._helpers.CheckpointError` that names the key.
    """
    state_dict = unwrap_state_dict(state_dict)
    target = model.state_dict()
    grid = tuple(model.patch_embed.grid_size)
    npt = model.num_prefix_tokens
    out = {}
    for k, v in state_dict.items():
        if k.startswith('dist_token') or k.startswith('head_dist'):
            continue  # distilled DeiT extras: the Sparsifiner backbone has no distillation token
        if k == 'pos_embed' and k in target and v.shape != target[k].shape:
            old = int(round((v.shape[1] - npt) ** 0.5))
            v = resample_abs_pos_embed(v, new_size=grid, old_size=(old, old), num_prefix_tokens=npt, verbose=True)
        elif k.rsplit('.', 1)[-1] in _TOKEN_PROJ and k in target and v.ndim == 2 and v.shape != target[k].shape \
                and v.shape[1] == target[k].shape[1]:
            old = int(round((v.shape[0] - npt) ** 0.5))
            if npt + old * old != v.shape[0]:
                raise CheckpointError(f"key '{k}' has {v.shape[0]} token rows, not 1 + a square grid")
            v = resize_token_projection(v, grid, (old, old), npt, rescale=k.endswith('proj_n'))
        elif k == 'patch_embed.proj.weight' and v.ndim < 4:
            v = v.reshape(target[k].shape)
        out[k] = v
    if not any(_PREDICTOR in k for k in out):
        _logger.info('checkpoint has no connectivity predictor (a DeiT checkpoint): keeping the fresh predictor init')
        out.update({k: v for k, v in target.items() if _PREDICTOR in k})
    check_state_dict(out, model, skip_prefixes=('head.',))
    return out


def _create_sparsifiner(variant: str, pretrained: bool = False, **kwargs) -> SparsifinerVisionTransformer:
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        SparsifinerVisionTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict:
    # official eval (src/datasets.py build_transform, crop_pct None -> 224 / 256): Resize(int(224 / crop_pct),
    # bicubic) (shorter side) -> CenterCrop(224), i.e. timm's 'center' mode
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.875, 'crop_mode': 'center', 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
        'paper_ids': 'arXiv:2303.13755', 'origin_url': 'https://github.com/lim142857/Sparsifiner',
        'license': 'mit', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'sparsifiner_deit_tiny.in1k': _cfg(),
    'sparsifiner_deit_small.in1k': _cfg(),
    'sparsifiner_deit_base.in1k': _cfg(),
})


@register_model
def sparsifiner_deit_tiny(pretrained: bool = False, **kwargs) -> SparsifinerVisionTransformer:
    """Sparsifiner DeiT-T @ 224, ρ=0.25, rank 32, top-8 (not released officially). 5.9M params, 1.18 GMACs."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_sparsifiner('sparsifiner_deit_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def sparsifiner_deit_small(pretrained: bool = False, **kwargs) -> SparsifinerVisionTransformer:
    """Sparsifiner DeiT-S @ 224, ρ=0.25, rank 32, top-8 (the released config). 22.3M params, 4.44 GMACs (analytic)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_sparsifiner('sparsifiner_deit_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def sparsifiner_deit_base(pretrained: bool = False, **kwargs) -> SparsifinerVisionTransformer:
    """Sparsifiner DeiT-B @ 224, ρ=0.25, rank 32, top-8 (not released officially). 86.8M params, 17.25 GMACs."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_sparsifiner('sparsifiner_deit_base', pretrained=pretrained, **dict(model_args, **kwargs))
