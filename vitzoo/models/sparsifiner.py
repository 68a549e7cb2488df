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
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.layers import use_fused_attn
from timm.models import generate_default_cfgs, register_model

from vitzoo.layers.sparse_attention import PREDICTOR_ARGS, SparseAttention, mask_from_indices
from ._blocks import PreNormBlock
from ._builder import build_model_with_cfg
from ._helpers import finish_state_dict, unwrap_state_dict
from ._vit import BlockState, DeiTShell, adapt_embeddings, deit_build_kwargs, deit_cfg

__all__ = ['SparsifinerVisionTransformer', 'sparsifiner_flops', 'TOKEN_SPARSE_KWARGS']

# The "attention + token sparsity" configuration: the official code's pruning blocks (default_config 3, 6, 9) with the
# DynamicViT / EViT reference keep rate 0.7 (r, r², r³ of the patches). The released yaml runs without token pruning
# and the paper states no keep rate, so this is the reference point for speed comparisons, not a released model.
TOKEN_SPARSE_KWARGS = dict(token_keep_rate=0.7, token_pruning_loc=(3, 6, 9))

_logger = logging.getLogger(__name__)

_PREDICTOR = 'attn.mask_predictor.'


class Block(PreNormBlock):
    """Pre-norm transformer block with Sparsifiner attention.

    ``forward(x, grid, token_idx=None, return_attn=False, need_cls_attn=False)`` passes its arguments after ``x`` to
    :meth:`SparseAttention.forward <vitzoo.layers.sparse_attention.SparseAttention.forward>` and returns
    ``(x, side outputs)``. ``kwargs``: the other arguments of :class:`~vitzoo.models._vit.PreNormBlock` (``mlp_ratio``,
    ``qkv_bias``, ...) and the predictor's of :class:`~vitzoo.layers.sparse_attention.SparseAttention` (``rank``, ...).
    """

    def __init__(self, dim: int, num_heads: int, grid_size: Tuple[int, int], keep_rate: float = 0.25, **kwargs):
        super().__init__(
            dim, num_heads, SparseAttention, grid_size=grid_size, keep_rate=keep_rate, fused_attn=use_fused_attn(),
            **kwargs)


def _per_layer(value: Union[float, Sequence[float]], depth: int, name: str) -> List[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * depth
    value = [float(v) for v in value]
    if len(value) != depth:
        raise ValueError(f'{name} has {len(value)} entries, expected one per block ({depth})')
    return value


@dataclass
class _SparsifinerState(BlockState):
    return_attn: bool = False  # the blocks return their attention probabilities
    keep_aux: bool = False  # keep every block's side outputs in ``auxes``
    token_idx: Optional[torch.Tensor] = None  # (B, kept) grid indices of the patch tokens (None before pruning)
    auxes: List[Dict[str, Any]] = field(default_factory=list)
    cls_attn: Optional[torch.Tensor] = None  # the last block's class-token attention, for the pruning after it


class SparsifinerVisionTransformer(DeiTShell):
    """DeiT with Sparsifiner attention in every block and optional class-attention token pruning.

    ``forward_features`` returns the final-normed tokens (B, 1 + kept, C): the class token, then the kept patch tokens
    in grid order; in ``forward_intermediates`` pruned token positions are zero (the original zeroes pruned tokens).

    Args:
        embed_dim: Width.
        depth: Blocks.
        num_heads: Heads.
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
        kwargs: The predictor's arguments above (``rank`` ... ``share_inout_proj``:
            :data:`~vitzoo.layers.sparse_attention.PREDICTOR_ARGS`, passed to every block; absent ones take the
            predictor's defaults) and the ViT arguments of :class:`~vitzoo.models._vit.DeiTShell` (``img_size`` sets
            the position table and the predictor's token projections), e.g. ``global_pool`` ('token' or 'avg': mean
            of the kept patch tokens), ``drop_path_rate``.
    """

    state_cls = _SparsifinerState

    def __init__(
            self,
            *,
            embed_dim: int = 384,
            depth: int = 12,
            num_heads: int = 6,
            attn_keep_rate: Union[float, Sequence[float]] = 0.25,
            token_keep_rate: float = 1.0,
            token_pruning_loc: Sequence[int] = (3, 6, 9),
            attn_recon: bool = False,
            mask_grad: bool = True,
            **kwargs,
    ):
        self._check_global_pool(kwargs.get('global_pool', 'token'))
        if not 0 < token_keep_rate <= 1:
            raise ValueError(f'token_keep_rate must be in (0, 1], got {token_keep_rate}')
        keep = _per_layer(attn_keep_rate, depth, 'attn_keep_rate')
        predictor_args = {k: kwargs.pop(k) for k in PREDICTOR_ARGS if k in kwargs}  # defaults: the predictor's

        def block_fn(i: int, **block_args) -> Block:
            return Block(**block_args, keep_rate=keep[i], **predictor_args)

        super().__init__(block_fn, embed_dim=embed_dim, depth=depth, num_heads=num_heads, **kwargs)
        self.token_keep_rate = float(token_keep_rate)
        self.token_pruning_loc = tuple(sorted(int(i) for i in token_pruning_loc if 0 <= int(i) < depth - 1)) \
            if token_keep_rate < 1 else ()
        self.attn_recon = attn_recon
        self.mask_grad = mask_grad

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

    # ---- the block loop's hooks: sparse attention and token pruning -----------------------------------------------

    def _run_block(self, i: int, blk: nn.Module, x: torch.Tensor, state: _SparsifinerState) -> torch.Tensor:
        need_cls_attn = self._prunes_after(i) is not None
        x, aux = self._checkpointed(blk, x, state.hw, state.token_idx, state.return_attn, need_cls_attn)
        if state.keep_aux:  # only on request: the approximate attentions are (B, H, n - 1, n) per block
            state.auxes.append(dict(aux, token_idx=state.token_idx))
        state.cls_attn = aux['cls_attn'] if need_cls_attn else None
        return x

    def _after_block(self, i: int, x: torch.Tensor, state: _SparsifinerState) -> torch.Tensor:
        keep = self._prunes_after(i)
        if keep is not None:
            x, state.token_idx = self._prune(x, state.cls_attn, state.token_idx, keep, state.hw)
        return x

    def _split_tokens(self, x: torch.Tensor, state: _SparsifinerState) -> Tuple[torch.Tensor, torch.Tensor]:
        patches, prefix = super()._split_tokens(x, state)
        if state.token_idx is not None:  # scatter the kept tokens back onto the grid (pruned positions are zero)
            full = patches.new_zeros(patches.shape[0], state.hw[0] * state.hw[1], patches.shape[-1])
            patches = full.scatter(1, state.token_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]), patches)
        return patches, prefix

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
        x, state, _ = self._forward_tokens(x, return_attn=return_attn, keep_aux=True)
        grid, token_idx, auxes = state.hw, state.token_idx, state.auxes
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
    # distilled DeiT extras dropped: the Sparsifiner backbone has no distillation token
    out = {k: v for k, v in unwrap_state_dict(state_dict).items() if not k.startswith(('dist_token', 'head_dist'))}
    adapt_embeddings(out, model)
    if not any(_PREDICTOR in k for k in out):
        _logger.info('checkpoint has no connectivity predictor (a DeiT checkpoint): keeping the fresh predictor init')
        out.update({k: v for k, v in model.state_dict().items() if _PREDICTOR in k})
    return finish_state_dict(out, model)  # the predictors resize their token projections, then every key is checked


def _create_sparsifiner(variant: str, pretrained: bool = False, **kwargs) -> SparsifinerVisionTransformer:
    return build_model_with_cfg(
        SparsifinerVisionTransformer, variant, pretrained, **deit_build_kwargs(checkpoint_filter_fn, **kwargs))


# official eval (src/datasets.py build_transform, crop_pct None -> 224 / 256): Resize(int(224 / crop_pct),
# bicubic) (shorter side) -> CenterCrop(224), i.e. timm's 'center' mode
_cfg = partial(
    deit_cfg, crop_mode='center', interpolation='bicubic', paper_ids='arXiv:2303.13755',
    origin_url='https://github.com/lim142857/Sparsifiner', license='mit')


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
