"""Sparsifiner attention: a low-rank connectivity predictor plus top-k sparse softmax attention.

Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers (Wei et al., CVPR 2023),
https://arxiv.org/abs/2303.13755. Official code: https://github.com/lim142857/Sparsifiner
(``src/models/sparsifiner.py``, class ``MaskPredictor``).

Per head, with Q, K the block's own (unscaled) queries / keys and n tokens (one class token first):

    C = softmax((Q W_cq + b_cq) ((K W_ck + b_ck)ᵀ P_down) · H^-1/2)      over the rank axis, class-token row dropped
    Ã = topk_t(C) · thr_τ(|P_up|)ᵀ                                         the "approximate attention" (n-1, n)
    M = row-wise top-⌈ρ·n⌉ of Ã, plus a dense class-token row              the binary connectivity mask
    O = softmax(mask_M(Q Kᵀ / √d)) V

``proj_c_q`` / ``proj_c_k`` (d → d / reduce_c) are shared by the heads, ``proj_n`` (P_down) and ``proj_back_n`` (P_up)
are (n, rank) token-axis projections shared by the heads. The official quirks that decide which keys are kept are
kept on purpose: the predictor scale is ``num_heads ** -0.5`` (not the reduced width), the softmax runs over the rank
axis, only the top ``basis_topk`` coefficients survive (no renormalisation), the basis is ``|P_up|`` with entries
``<= basis_threshold`` zeroed, and the top-k budget ⌈ρ·n⌉ counts the class-token column. In the phase-1 "attention
reconstruction" mode (``signed_basis=True``) the coefficients stay dense and the basis is the signed ``P_up``.

Beyond the official code:
- **any resolution**: ``proj_n`` / ``proj_back_n`` are tied to the construction grid (197 tokens at 224²) in the
  original, which fails at any other size. Here their patch rows are treated as a (h, w, rank) grid and resized
  bicubically to the actual token grid (class-token row unchanged), like a position table. ``proj_n`` sums over tokens
  (Linformer-style), so its resized patch rows are scaled by ``old_patches / new_patches`` to keep the magnitude of
  the rank coefficients' logits; ``proj_back_n`` is a per-key value and is not rescaled. The budget is ⌈ρ·n⌉ of the
  actual token count;
- **no dense -inf matrix + nan_to_num**: the kept keys become an additive 0 / -inf bias (one fill, one scatter from
  an expanded zero source, ~1.6x faster than the scalar scatter) that goes straight into
  ``F.scaled_dot_product_attention`` (measured on CPU: a float bias costs ~15-25% over unmasked SDPA, a bool mask
  ~2.2x, gather-based attention over the 50 kept keys ~35x; building the bias from a threshold with ``where`` /
  ``masked_fill`` is 3-6x slower than the scatter); the explicit path (``fused_attn=False``) materialises the same
  masked softmax. The unmasked softmax the original always computes (only for a disabled self-distillation loss) is
  skipped. The predictor applies its per-head linears to q / k in place (strided views of the qkv output) instead of
  to copies, bitwise equal to the original's order, and both top-k selections run on the integer view of the
  non-negative scores (:func:`topk_nonneg`, same indices). Where the time still goes (CPU, DeiT-S, batch 8): the
  exact per-row top-⌈ρn⌉ (``torch.topk``, 9,408 rows of 197 per block) costs about a third of a dense DeiT-S block
  by itself, more than the attention products it makes prunable (7.8% of DeiT-S FLOPs); no cheaper exact selection
  exists among eager torch ops (``kthvalue`` / ``sort`` are slower, a threshold search needs ~31 compare-and-count
  passes, and a ``torch.compile``-d bisection was 3.7x slower than ``topk``), so at n = 197 the sparse model stays
  ~1.4-1.7x the latency of the dense one; token pruning is what pays;
- **physical token dropping**: with ``token_idx`` the attention runs on the kept tokens only and the token projections
  are gathered to them (the original zeroes pruned tokens but keeps computing them);
- **straight-through mask gradient** (``mask_grad=True``): the connectivity mask is a hard top-k and carries no
  gradient in the original (``attn_mask.detach_()``). Here, when the predictor's parameters require gradients, the
  kept entries of the additive bias are ``Ã - Ã.detach()`` (exactly 0 in value), so the task loss reaches the
  predictor as the gradient of a logit bias on the kept connections. The outputs are bit-identical. The predictor reads
  detached q / k, so this path (and the phase-1 reconstruction loss) never sends gradient into the backbone: with the
  official two-phase schedule (predictor frozen in phase 2) the backbone's gradients equal the original's;
- the top-k budget is recomputed every call (the original writes ``min(budget, #tokens)`` back into the module, so a
  token-pruned call shrinks the budget of every later call).

This module imports only torch.
"""
import fractions
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .attention import MultiHeadAttention
from .sdpa import use_sdpa
from .linear import Linear

__all__ = [
    'PREDICTOR_ARGS', 'ConnectivityPredictor', 'SparseAttention', 'resize_token_projection', 'attention_budget',
    'mask_from_indices', 'topk_nonneg',
]


def _trunc_normal_(t: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    # Same distribution as timm's trunc_normal_(std=.02) (bounds ±2 absolute, i.e. effectively untruncated).
    return nn.init.trunc_normal_(t, std=std, a=-2.0, b=2.0)


def resize_token_projection(
        weight: torch.Tensor,
        new_grid: Tuple[int, int],
        old_grid: Tuple[int, int],
        num_prefix_tokens: int = 1,
        rescale: bool = False,
) -> torch.Tensor:
    """Resize the token axis of an (n, rank) projection from an ``old_grid`` of patches to ``new_grid``.

    The prefix (class-token) rows are kept; the patch rows are resized bicubically as an (h, w, rank) map.

    Args:
        weight: (prefix + old_h * old_w, rank) tensor.
        new_grid: Target (h, w) patch grid.
        old_grid: Grid the weight was made for.
        num_prefix_tokens: Leading non-patch rows.
        rescale: Multiply the patch rows by ``old_patches / new_patches`` (for projections that sum over tokens).
    """
    new_grid, old_grid = tuple(new_grid), tuple(old_grid)
    # a symbolic grid (dynamic-shape compile / export) takes the resize, exact at an equal size, rather than a guard
    # specialising the graph to the example size
    if all(statically_known_true(a == b) for a, b in zip(new_grid, old_grid)):
        return weight
    n_old = old_grid[0] * old_grid[1]
    if weight.shape[0] != num_prefix_tokens + n_old:
        raise ValueError(f'token projection has {weight.shape[0]} rows, expected {num_prefix_tokens} + {old_grid[0]}x'
                         f'{old_grid[1]} = {num_prefix_tokens + n_old}')
    prefix, grid = weight[:num_prefix_tokens], weight[num_prefix_tokens:]
    rank = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], rank).permute(0, 3, 1, 2)
    # antialias only matters when shrinking; float64 stays float64 (the exact-parity mode), half types go via fp32
    work = grid if grid.dtype in (torch.float32, torch.float64) else grid.float()
    grid = F.interpolate(work, size=new_grid, mode='bicubic', align_corners=False, antialias=True)
    grid = grid.to(weight.dtype).permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], rank)
    if rescale:
        grid = grid * (n_old / (new_grid[0] * new_grid[1]))
    return torch.cat([prefix, grid], dim=0)


def attention_budget(keep_rate: float, num_tokens: int, num_active: Optional[int] = None, num_prefix_tokens: int = 1,
                     ) -> int:
    """Keys kept per predicted query row: ⌈keep_rate · num_tokens⌉, at most the active non-prefix tokens (official).

    Args:
        keep_rate: Attention keep ratio ρ.
        num_tokens: Tokens of the full (unpruned) sequence, class token included (197 at 224²).
        num_active: Tokens present now (after token pruning), class token included.
        num_prefix_tokens: Leading non-patch tokens.
    """
    if isinstance(num_tokens, int):
        budget = math.ceil(keep_rate * num_tokens)
    else:
        # symbolic size (torch.export with dynamic height/width): integer ceil of the rate's exact binary fraction,
        # which exported programs can serialise (math.ceil of a symbolic float they cannot); equal to the float
        # ceil unless keep_rate * num_tokens rounds onto an integer, never for dyadic rates such as 0.25
        frac = fractions.Fraction(keep_rate)
        budget = (frac.numerator * num_tokens + frac.denominator - 1) // frac.denominator
    if num_active is not None and num_active < num_tokens:
        budget = min(budget, num_active - num_prefix_tokens)
    return budget


def mask_from_indices(
        idx: Optional[torch.Tensor],
        num_tokens: int,
        num_prefix_tokens: int = 1,
        shape: Optional[Sequence[int]] = None,
        device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Dense boolean (B, H, n, n) connectivity mask from the kept-key indices (B, H, n - prefix, k).

    Prefix-query rows are dense (official). ``idx=None`` (a dense layer) gives all True of ``shape`` (B, H).
    """
    if idx is None:
        if shape is None:
            raise ValueError('mask_from_indices needs shape=(B, H) when idx is None')
        return torch.ones(*shape, num_tokens, num_tokens, dtype=torch.bool, device=device)
    B, H = idx.shape[:2]
    mask = torch.zeros(B, H, num_tokens, num_tokens, dtype=torch.bool, device=idx.device)
    mask[:, :, :num_prefix_tokens] = True
    mask[:, :, num_prefix_tokens:].scatter_(-1, idx, True)
    return mask


# ConnectivityPredictor's arguments that the attention and the model pass through from their callers
PREDICTOR_ARGS = ('rank', 'reduce_n_factor', 'reduce_c_factor', 'basis_topk', 'basis_threshold', 'share_inout_proj')


class ConnectivityPredictor(nn.Module):
    """The official ``MaskPredictor``: low-rank approximate attention of the non-prefix queries.

    Parameter names and order follow the official checkpoints (``proj_n``, ``proj_back_n``, ``proj_c_q``,
    ``proj_c_k``).

    Args:
        head_dim: Per-head width d.
        num_heads: Heads H (sets the quirky scale H^-1/2).
        grid_size: Construction patch grid (h, w); the projections have 1 + h * w rows.
        rank: Token-axis rank (default ``(prefix + h * w) // reduce_n_factor``, 32 at 224²).
        reduce_n_factor: Rank divisor when ``rank`` is None.
        reduce_c_factor: d / reduced width of the per-head q / k projections.
        basis_topk: Rank coefficients kept per query row (sparse mode).
        basis_threshold: |P_up| entries <= this are zeroed (sparse mode).
        share_inout_proj: Use one tensor for ``proj_n`` and ``proj_back_n``.
        num_prefix_tokens: Leading non-patch tokens (1: the class token).
    """

    def __init__(
            self,
            head_dim: int,
            num_heads: int,
            grid_size: Tuple[int, int] = (14, 14),
            rank: Optional[int] = None,
            reduce_n_factor: int = 6,
            reduce_c_factor: int = 2,
            basis_topk: int = 8,
            basis_threshold: float = 0.02,
            share_inout_proj: bool = False,
            num_prefix_tokens: int = 1,
    ):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.num_tokens = num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.reduced_c = head_dim // reduce_c_factor
        self.rank = int(rank) if rank else int(self.num_tokens // reduce_n_factor)
        if self.rank < 1 or self.reduced_c < 1:
            raise ValueError(f'ConnectivityPredictor: rank {self.rank} and reduced width {self.reduced_c} must be >= 1')
        if basis_topk < 1:
            raise ValueError(f'basis_topk must be >= 1, got {basis_topk}')
        self.basis_topk = min(int(basis_topk), self.rank)
        self.basis_threshold = float(basis_threshold)
        self.scale = num_heads ** -0.5  # official quirk: not reduced_c ** -0.5

        self.proj_n = nn.Parameter(_trunc_normal_(torch.zeros(self.num_tokens, self.rank)))
        if share_inout_proj:
            self.proj_back_n = self.proj_n
        else:
            self.proj_back_n = nn.Parameter(_trunc_normal_(torch.zeros(self.num_tokens, self.rank)))
        self.proj_c_q = Linear(head_dim, self.reduced_c)
        self.proj_c_k = Linear(head_dim, self.reduced_c)

    def adapt_state_dict(self, state_dict: Dict[str, torch.Tensor], prefix: str = '') -> None:
        """Fit this predictor's token projections of a checkpoint (keys under ``prefix``) to its grid, in place.

        Projections made for another square grid (prefix + g * g rows, same rank) are resized as at run time
        (:func:`resize_token_projection`; ``proj_n`` rescaled). Tensors that differ otherwise are left as they are, for
        the model's key check to report.

        Args:
            state_dict: Checkpoint with the model's key names (changed in place).
            prefix: This module's name in the model, with a trailing dot.
        """
        npt = self.num_prefix_tokens
        for name in ('proj_n', 'proj_back_n'):
            v = state_dict.get(prefix + name)
            own = getattr(self, name).shape
            if v is None or v.ndim != 2 or v.shape == own or v.shape[1] != own[1]:
                continue
            old = int(round((v.shape[0] - npt) ** 0.5))
            if npt + old * old == v.shape[0]:
                state_dict[prefix + name] = resize_token_projection(
                    v, self.grid_size, (old, old), npt, rescale=name == 'proj_n')

    def token_projections(
            self,
            grid: Tuple[int, int],
            token_idx: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(P_down, P_up) for a token grid: resized if it is not the construction grid, gathered to kept tokens.

        Returns (n, rank) tensors, or (B, 1, n, rank) when ``token_idx`` (B, kept) selects per-image patch tokens.
        """
        p_down = resize_token_projection(self.proj_n, grid, self.grid_size, self.num_prefix_tokens, rescale=True)
        if self.proj_back_n is self.proj_n:
            p_up = resize_token_projection(self.proj_n, grid, self.grid_size, self.num_prefix_tokens)
        else:
            p_up = resize_token_projection(self.proj_back_n, grid, self.grid_size, self.num_prefix_tokens)
        if token_idx is not None:
            p_down, p_up = (_gather_tokens(p, token_idx, self.num_prefix_tokens) for p in (p_down, p_up))
        return p_down, p_up

    def coef_logits(self, q: torch.Tensor, k: torch.Tensor, p_down: torch.Tensor) -> torch.Tensor:
        """Scaled rank-coefficient logits (B, H, n - prefix, rank) = proj_c_q(q) · (proj_c_k(k)ᵀ P_down) · H^-1/2.

        The original's association and order (bitwise equal to it), without its copies: the shared per-head linears
        run head by head on q / k as they lie in the fused qkv output (``(B, n, d)`` per head is a strided view a GEMM
        reads in place), instead of on a contiguous copy of all heads. The prefix query rows are computed and dropped
        (they are dense in the mask) because slicing first would break that view. A re-associated form (one GEMM for
        ``kᵀ P_down`` over all heads) is ~25% faster still but changes the rounding, which flips fp32 near-ties of the
        top-k against the original noticeably often; not worth ~2% of a block.

        Args:
            q: Unscaled queries (B, H, n, d), any strides.
            k: Keys (B, H, n, d), any strides.
            p_down: (n, rank) token down-projection, or (B, 1, n, rank) per image.
        """
        heads = range(q.shape[1])
        qc = torch.stack([self.proj_c_q(q[:, h]) for h in heads], dim=1)[:, :, self.num_prefix_tokens:]
        kc = torch.stack([self.proj_c_k(k[:, h]) for h in heads], dim=1)
        k_down = kc.transpose(-2, -1) @ p_down  # B, H, c, rank
        return (qc @ k_down) * self.scale

    def forward(
            self,
            q: torch.Tensor,
            k: torch.Tensor,
            grid: Tuple[int, int],
            token_idx: Optional[torch.Tensor] = None,
            signed_basis: bool = False,
    ) -> torch.Tensor:
        """Approximate attention (B, H, n - prefix, n) of the non-prefix queries.

        Args:
            q: Unscaled queries (B, H, n, d).
            k: Keys (B, H, n, d).
            grid: Full patch grid of the image (h, w).
            token_idx: (B, kept) patch indices of the tokens present in q / k (after token pruning).
            signed_basis: Phase-1 form (dense coefficients, signed P_up) instead of the sparse one.
        """
        npt = self.num_prefix_tokens
        p_down, p_up = self.token_projections(grid, token_idx)
        coef = self.coef_logits(q, k, p_down).softmax(dim=-1)  # B, H, n - prefix, rank
        basis = p_up.transpose(-2, -1)  # rank, n
        if not signed_basis:
            basis = F.threshold(basis.abs(), self.basis_threshold, 0.)
            if self.basis_topk < self.rank:
                ind = topk_nonneg(coef, self.basis_topk)[1]
                # gather keeps the kept coefficients' gradient (straight-through mask training of the predictor)
                coef = torch.zeros_like(coef).scatter_(-1, ind, coef.gather(-1, ind))
        return coef @ basis


# Signed integer types with the width of each float type: non-negative IEEE floats order like their bit patterns.
_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def topk_nonneg(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``scores.topk(k, dim=-1, sorted=False)`` (values, indices) for scores that are all ``>= +0`` (no -0, no NaN).

    The selection runs on the integer view of the float bits: for non-negative floats every comparison has the same
    outcome as the float comparison (so the same indices, ties included) without the float comparator's NaN tests.
    About 10% faster on CPU; the exact per-row top-k (``torch.topk``) is the single largest cost of the sparse block.
    The connectivity scores and the basis coefficients qualify: softmax outputs times an absolute-valued basis.
    """
    scores = scores.detach()
    view = _INT_VIEW.get(scores.element_size()) if scores.is_floating_point() else None
    if view is None or torch.compiler.is_exporting():  # ONNX has no bit-cast view: exported graphs use the float top-k
        return scores.topk(k, dim=-1, sorted=False)
    val, idx = scores.view(view).topk(k, dim=-1, sorted=False)
    return val.view(scores.dtype), idx


def _gather_tokens(p: torch.Tensor, token_idx: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Rows of an (n, r) projection for the prefix tokens and the kept patches: (B, 1, prefix + kept, r)."""
    B = token_idx.shape[0]
    prefix = p[:num_prefix_tokens].expand(B, -1, -1)
    patches = p[num_prefix_tokens:][token_idx]  # B, kept, r
    return torch.cat([prefix, patches], dim=1).unsqueeze(1)


def _mask_bias(approx: torch.Tensor, idx: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Additive (B, H, n, n) bias: 0 on kept keys and on the prefix rows, -inf elsewhere.

    When ``approx`` requires grad, the kept entries are ``approx - approx.detach()`` (0 in value): a straight-through
    path from the attention logits to the predictor.
    """
    B, H, nq, n = approx.shape
    bias = approx.new_full((B, H, n, n), float('-inf'))
    bias[:, :, :num_prefix_tokens] = 0.
    if approx.requires_grad:
        bias[:, :, num_prefix_tokens:].scatter_(-1, idx, torch.gather(approx - approx.detach(), -1, idx))
    else:  # an expanded zero source: the scalar-value scatter kernel is ~1.6x slower on CPU
        bias[:, :, num_prefix_tokens:].scatter_(-1, idx, bias.new_zeros(()).expand(idx.shape))
    return bias


class SparseAttention(MultiHeadAttention):
    """Multi-head self-attention whose non-prefix queries attend only to predicted top-k keys.

    ``qkv`` / ``proj`` follow the timm / official names, the predictor is ``mask_predictor`` (official name).

    Modes (set by the owning model):
      - eval, or train with ``attn_recon=False``: sparse attention (the deployed model, phase 2);
      - train with ``attn_recon=True``: phase 1 "attention reconstruction": dense attention, signed-basis predictor;
      - ``keep_rate >= 1`` outside phase 1: dense attention and no predictor.

    Args:
        dim: Width.
        num_heads: Heads.
        grid_size: Construction patch grid (sets the predictor's token projections).
        keep_rate: Attention keep ratio ρ (budget ⌈ρ·n⌉ keys per query row).
        qkv_bias: Bias in qkv.
        attn_drop: Attention dropout (not applied by the original, which ignores its ``attn_drop_rate``).
        proj_drop: Output dropout.
        num_prefix_tokens: Leading non-patch tokens (dense query rows).
        fused_attn: Use ``F.scaled_dot_product_attention`` (else the explicit masked softmax).
        predictor_kwargs: The predictor's own arguments (:data:`PREDICTOR_ARGS`: ``rank``, ``reduce_n_factor``,
            ``reduce_c_factor``, ``basis_topk``, ``basis_threshold``, ``share_inout_proj``; see
            :class:`ConnectivityPredictor`).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            grid_size: Tuple[int, int] = (14, 14),
            keep_rate: float = 0.25,
            qkv_bias: bool = True,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            num_prefix_tokens: int = 1,
            fused_attn: bool = True,
            **predictor_kwargs: Any,
    ):
        if dim % num_heads == 0 and keep_rate <= 0:  # checked before the base builds its projections
            raise ValueError(f'keep_rate must be > 0, got {keep_rate}')
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
                         fused_attn=fused_attn)
        self.keep_rate = float(keep_rate)
        self.num_prefix_tokens = num_prefix_tokens
        self.attn_recon = False  # phase-1 mode (only in train mode); set by the model
        self.mask_grad = True  # straight-through mask gradient to the predictor (see the module docstring)
        self.mask_predictor = ConnectivityPredictor(
            self.head_dim, num_heads, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens, **predictor_kwargs)

    def budget(self, grid: Tuple[int, int], num_active: int) -> int:
        """Kept keys per predicted query row for an image grid with ``num_active`` tokens present."""
        return attention_budget(self.keep_rate, self.num_prefix_tokens + grid[0] * grid[1], num_active,
                                self.num_prefix_tokens)

    def forward(
            self,
            x: torch.Tensor,
            grid: Tuple[int, int],
            token_idx: Optional[torch.Tensor] = None,
            return_attn: bool = False,
            need_cls_attn: bool = False,
    ) -> Tuple[torch.Tensor, Dict[str, Optional[torch.Tensor]]]:
        """Attend; returns the output and a dict of side outputs.

        Args:
            x: Tokens (B, n, C): prefix tokens first, then the (kept) patch tokens.
            grid: The image's full patch grid (h, w).
            token_idx: (B, kept) patch indices of the tokens in ``x`` when tokens were pruned.
            return_attn: Also return the attention probabilities (explicit path).
            need_cls_attn: Also return the first prefix query's attention over the patch tokens (B, H, n - prefix).

        Side outputs: ``approx`` (B, H, n - prefix, n) or None, ``idx`` kept-key indices (B, H, n - prefix, k) or None
        (dense), ``attn`` and ``cls_attn`` when asked.
        """
        N = x.shape[1]
        npt = self.num_prefix_tokens
        q, k, v = self._split_qkv(x)

        phase1 = self.training and self.attn_recon
        budget = self.budget(grid, N)
        sparse = not phase1 and budget < N
        approx = idx = bias = None
        if phase1 or sparse:
            pred = self.mask_predictor
            grad_to_pred = torch.is_grad_enabled() and any(p.requires_grad for p in pred.parameters())
            with torch.set_grad_enabled(grad_to_pred and (phase1 or self.mask_grad)):
                # detached q / k: the backbone is never trained through the predictor (see module docstring)
                approx = pred(q.detach(), k.detach(), grid, token_idx, signed_basis=phase1)
        if sparse:
            idx = topk_nonneg(approx, budget)[1]  # the mask is a hard top-k: no gradient through the selection
            bias = _mask_bias(approx, idx, npt)

        out: Dict[str, Optional[torch.Tensor]] = {'approx': approx, 'idx': idx}
        if self.fused_attn and not return_attn and use_sdpa(q, k, v, bias):
            x = self._sdpa(q, k, v, bias)
            if need_cls_attn:
                out['cls_attn'] = self._logits(q[:, :, :1], k).softmax(-1)[:, :, 0, npt:]
        else:
            attn = self._logits(q, k)
            if bias is not None:
                attn = attn + bias
            attn = attn.softmax(dim=-1)
            if return_attn:
                out['attn'] = attn
            if need_cls_attn:
                out['cls_attn'] = attn[:, :, 0, npt:]
            x = self.attn_drop(attn) @ v
        return self._project(x), out
