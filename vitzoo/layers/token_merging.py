"""Token merging on a 2-D token grid: bipartite soft matching (ToMe / ToMeSD), with AgentSD's agent merge.

Token Merging for Fast Stable Diffusion (Bolya & Hoffman, CVPRW 2023), https://arxiv.org/abs/2303.17604, and
Agent Attention (Han et al., ECCV 2024), https://arxiv.org/abs/2312.08874 (AgentSD). Reference code: ``dbolya/tomesd``
and ``LeapLabTHU/Agent-Attention/agentsd/merge.py``; this is a re-implementation with the same semantics:

- the h x w grid is cut into sy x sx cells; one token per cell is a destination (dst), all others (including the
  rows / columns left over when sy, sx do not divide h, w) are sources (src). The dst sits at the top-left of its cell,
  or at a random position of the cell drawn from ``generator`` (one draw per cell, shared by the whole batch);
- every src is matched to its most cosine-similar dst (similarity of the ``metric`` tokens);
- the ``r`` src with the highest best-match similarity are averaged into their dst ("mean" merge, the dst included),
  leaving ``N - r`` tokens (``r`` is capped at the number of src);
- agent tokens (AgentSD) come from a second, more aggressive merge of the same matching with ``agent_r`` instead of
  ``r`` (capped at the number of src); they exist only if ``(N - agent_r) * 2 < N - r``;
- unmerge gives every token the output of the merged token it went into.

Implementation differences from the reference code (same results up to fp summation order):

- merge gathers the representative rows (dst and unmerged src), adds the r merged src rows into their dst
  (``index_add_``) and scales by 1 / count; unmerge is one ``index_select`` with the merged slot of every token;
- the merged tokens are ordered [dst, unmerged src] instead of [unmerged src, dst]. Attention is permutation
  equivariant, so the unmerged output does not depend on this order;
- the similarity is ``metric @ dst_hat.T`` over all N tokens divided by the token norms afterwards (no normalised copy
  and no src gather), computed in fp32 for half-precision inputs (a fp16 squared norm overflows for |x| > ~14);
- agent tokens are merged from the merged-token sums (every merge group lies inside one agent group), not from all N
  tokens again;
- ``r <= 0`` gives an identity merge (the reference returns a one-output function that AgentSD then unpacks into two,
  silently splitting the batch);
- the dst / src partition is computed directly (the reference argsorts a 0 / -1 buffer, which is not a stable order on
  CPU).

This module imports only torch.
"""
import math
from typing import Dict, Optional, Tuple

import torch

from .workspace import Workspace

__all__ = ['TokenMerge', 'grid_partition', 'bipartite_soft_matching_2d', 'downsample_factor']

_PARTITION_CACHE: Dict[tuple, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_SCORE_CHUNK_BYTES = 1 << 22


def _partition(
        h: int,
        w: int,
        sx: int,
        sy: int,
        generator: Optional[torch.Generator],
        device: torch.device,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dst, src, inverse of the [dst, src] permutation); cached per grid when not random."""
    if h < 1 or w < 1 or sx < 1 or sy < 1:
        raise ValueError(f'grid_partition: need a positive grid and strides, got h={h}, w={w}, sx={sx}, sy={sy}')
    key = (h, w, sx, sy, str(device))
    if generator is None and key in _PARTITION_CACHE:
        return _PARTITION_CACHE[key]
    hsy, wsx = h // sy, w // sx
    if generator is None:
        offset = torch.zeros(hsy, wsx, dtype=torch.int64)
    else:
        offset = torch.randint(sy * sx, (hsy, wsx), generator=generator, device=generator.device).cpu()
    rows = torch.arange(hsy).view(-1, 1) * sy + offset // sx
    cols = torch.arange(wsx).view(1, -1) * sx + offset % sx
    dst = (rows * w + cols).reshape(-1)
    is_src = torch.ones(h * w, dtype=torch.bool)
    is_src[dst] = False
    src = is_src.nonzero().squeeze(1)
    inv = torch.empty(h * w, dtype=torch.int64)
    inv[torch.cat([dst, src])] = torch.arange(h * w)
    out = (dst.to(device), src.to(device), inv.to(device))
    if generator is None:
        if len(_PARTITION_CACHE) > 64:  # a handful of grids is normal; keep the cache bounded anyway
            _PARTITION_CACHE.clear()
        _PARTITION_CACHE[key] = out
    return out


def grid_partition(
        h: int,
        w: int,
        sx: int,
        sy: int,
        generator: Optional[torch.Generator] = None,
        device: Optional[torch.device] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split the row-major tokens of an h x w grid into one dst per sy x sx cell and the src rest.

    Args:
        h: Grid height in tokens.
        w: Grid width in tokens.
        sx: Cell width.
        sy: Cell height.
        generator: CPU generator for a random dst position inside each cell; ``None`` takes the top-left token.
        device: Device of the returned indices.

    Returns:
        ``(dst, src)``: int64 token positions, dst in cell order, src ascending.
    """
    device = torch.device('cpu') if device is None else torch.device(device)
    dst, src, _ = _partition(h, w, sx, sy, generator, device)
    return dst, src


class TokenMerge:
    """The result of one matching: merge / unmerge functions for tokens of the matched grid.

    Merged tokens are laid out as [dst (one per cell), unmerged src by decreasing best-match similarity] and agent
    tokens as [dst, src unmerged even for the agents]: the agents are the merged tokens minus one contiguous slice,
    which is added into its dst. Merging is therefore two row gathers plus an ``index_add_`` of the merged rows only
    (on CPU ~3x faster than a ``scatter_add_`` of all N tokens with an expanded (B, N, C) index).

    Attributes:
        num_tokens: N, tokens before merging.
        num_merged: N - r, tokens after merging.
        num_agents: N - agent_r agent tokens, or 0 when there are none.
        r: Tokens merged away.
        agent_r: Tokens merged away for the agents (0 without agents).
    """

    def __init__(
            self,
            num_tokens: int,
            batch_size: Optional[int] = None,
            device: Optional[torch.device] = None,
            dst: Optional[torch.Tensor] = None,
            src_sorted: Optional[torch.Tensor] = None,
            dst_of_sorted: Optional[torch.Tensor] = None,
            inv_partition: Optional[torch.Tensor] = None,
            r: int = 0,
            agent_r: int = 0,
    ):
        """Identity merge with ``r == 0``; otherwise the layouts from a matching.

        Args:
            num_tokens: N.
            batch_size: B.
            device: Device of the index tensors.
            dst: (Nd,) dst token positions.
            src_sorted: (B, Ns) src token positions by decreasing best-match similarity.
            dst_of_sorted: (B, Ns) best dst (index into ``dst``) of every sorted src.
            inv_partition: (N,) inverse of the [dst, src] permutation (``src`` ascending).
            r: Tokens merged away (<= Ns).
            agent_r: Tokens merged away for the agents; agents are built only if ``agent_r > r`` and
                ``(N - agent_r) * 2 < N - r``.
        """
        self.num_tokens = N = num_tokens
        self.r = r if r > 0 else 0
        self.num_merged = M = N - self.r
        self.num_agents = 0
        self.agent_r = 0
        self._batch = batch_size
        if self.r == 0:
            return
        B = batch_size
        nd = dst.numel()
        self.num_dst = nd
        ar = torch.arange(N, device=device)
        rows = torch.arange(B, device=device).view(B, 1)
        # representatives: the dst and the unmerged src, in merged-slot order; the r merged src get added to their dst
        rep = torch.cat([dst.expand(B, -1), src_sorted[:, r:]], dim=1)
        self._rep_flat = (rep + rows * N).reshape(-1)
        self._add_flat = (src_sorted[:, :r] + rows * N).reshape(-1)
        self._add_dst = dst_of_sorted[:, :r]
        self._rows = rows
        # merged slot of every token (for unmerge): dst j -> j, src of rank k -> its dst if k < r else nd + k - r
        slot_sorted = torch.cat([dst_of_sorted[:, :r], ar[nd:N - r].expand(B, -1)], dim=1)
        slot = torch.cat([ar[:nd].expand(B, -1), _unsort(slot_sorted, src_sorted, nd, inv_partition)], dim=1)
        slot = slot.index_select(1, inv_partition)
        self._flat = (slot + rows * M).reshape(-1)
        count = torch.ones(B, M, device=device)
        count[:, :nd] += _per_row_bincount(self._add_dst, nd)
        self._inv_count = count.reciprocal().unsqueeze(-1)
        num_agents = N - agent_r
        if agent_r > r and num_agents * 2 < M:
            self.num_agents = num_agents
            self.agent_r = agent_r
            k = agent_r - r  # unmerged src that still go into their dst for the agents
            self._k = k
            self._agent_add_dst = dst_of_sorted[:, r:agent_r]
            acount = torch.ones(B, num_agents, device=device)
            acount[:, :nd] = count[:, :nd] + _per_row_bincount(self._agent_add_dst, nd)
            self._inv_agent_count = acount.reciprocal().unsqueeze(-1)

    @property
    def is_identity(self) -> bool:
        """True when nothing is merged (``r == 0``): merge and unmerge return their input."""
        return self.r == 0

    @property
    def has_agents(self) -> bool:
        return self.num_agents > 0

    @property
    def batch_size(self) -> Optional[int]:
        """Batch size of the matching (``None`` for the identity merge, which accepts any batch)."""
        return None if self.is_identity else self._batch

    def merge(self, x: torch.Tensor, with_agents: bool = False, workspace: Optional[Workspace] = None):
        """Average the tokens of every merge group.

        Args:
            x: (B, N, C) tokens of the matched grid.
            with_agents: Also return the agent tokens.
            workspace: Scratch slots for the row gathers (ignored when ``x`` needs a gradient). The merged tokens
                then live in the workspace and are overwritten by its next merge.

        Returns:
            (B, N - r, C) merged tokens, or ``(merged, agents)`` with agents (B, N - agent_r, C) or ``None`` when
            ``with_agents`` is set. Half-precision inputs are summed in fp32 and returned in their dtype.
        """
        if self.is_identity:
            return (x, None) if with_agents else x
        B, N, C = x.shape
        if N != self.num_tokens or B != self._batch:
            raise ValueError(f'TokenMerge: matched {self._batch} x {self.num_tokens} tokens, got {B} x {N}')
        dtype = x.dtype
        acc = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        flat = acc.reshape(B * N, C)
        ws = workspace if not (torch.is_grad_enabled() and x.requires_grad) else None

        def gather(name: str, index: torch.Tensor, rows: int) -> torch.Tensor:
            out = None if ws is None else ws.get(name, (index.numel(), C), flat)
            return torch.index_select(flat, 0, index, out=out).view(B, rows, C)

        sums = gather('merge.sums', self._rep_flat, self.num_merged)
        _accumulate(sums, self._rows, self._add_dst, gather('merge.added', self._add_flat, self.r))
        agents = None
        if with_agents and self.has_agents:
            nd, k = self.num_dst, self._k
            agents = torch.cat([sums[:, :nd], sums[:, nd + k:]], dim=1)
            if k:
                _accumulate(agents, self._rows, self._agent_add_dst, sums[:, nd:nd + k])
            agents = agents.mul_(self._inv_agent_count).to(dtype)
        if torch.is_grad_enabled() and sums.requires_grad:
            merged = sums * self._inv_count
        else:
            merged = sums.mul_(self._inv_count)
        merged = merged.to(dtype)
        return (merged, agents) if with_agents else merged

    def merge_agents(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Only the agent tokens (B, N - agent_r, C) of ``x``, or ``None`` without agents."""
        if not self.has_agents:
            return None
        return self.merge(x, with_agents=True)[1]

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """Scatter (B, N - r, C) merged outputs back to (B, N, C): each token gets its merged token's output."""
        if self.is_identity:
            return x
        B, M, C = x.shape
        if M != self.num_merged or B != self._batch:
            raise ValueError(f'TokenMerge: expected {self._batch} x {self.num_merged} merged tokens, got {B} x {M}')
        return x.reshape(B * M, C).index_select(0, self._flat).view(B, self.num_tokens, C)

    def __repr__(self) -> str:
        return (f'TokenMerge(num_tokens={self.num_tokens}, num_merged={self.num_merged}, '
                f'num_agents={self.num_agents})')


def _accumulate(out: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    """``out[b, idx[b, j]] += values[b, j]`` for (B, M, C) ``out``, (B, K) ``idx`` and (B, K, C) ``values``."""
    B, M, C = out.shape
    flat_idx = idx if B == 1 else idx + rows * M
    out.view(B * M, C).index_add_(0, flat_idx.reshape(-1), values.reshape(-1, C))


def _per_row_bincount(idx: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size) float counts of the values of every row of ``idx`` (B, K)."""
    B = idx.shape[0]
    flat = idx + torch.arange(0, B * size, size, device=idx.device).view(B, 1)
    return torch.bincount(flat.reshape(-1), minlength=B * size).view(B, size).float()


def _unsort(
        values_sorted: torch.Tensor,
        src_sorted: torch.Tensor,
        nd: int,
        inv_partition: torch.Tensor,
) -> torch.Tensor:
    """Values given per sorted src -> values per src in ascending src order (the [dst, src] partition order)."""
    B, ns = values_sorted.shape
    # position of every src inside the ascending src list = inverse partition index minus the dst count
    src_rank = inv_partition.index_select(0, src_sorted.reshape(-1)).view(B, ns) - nd
    return torch.empty_like(values_sorted).scatter_(1, src_rank, values_sorted)


@torch.no_grad()
def _match(metric: torch.Tensor, dst: torch.Tensor, src: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best cosine similarity and index of the best dst for every src token, (B, Ns) each."""
    if metric.dtype not in (torch.float32, torch.float64):
        metric = metric.float()
    B, N, _ = metric.shape
    norm = metric.norm(dim=-1)  # (B, N)
    d_t = (metric.index_select(1, dst) / norm.index_select(1, dst).unsqueeze(-1)).transpose(-1, -2)
    # The cosine argmax over dst does not depend on the src norm: score every token against the normalised dst, take
    # the row maxima, then divide them by the src norms (no normalised N x C copy, no gathered src copy). The scores
    # are made in row chunks of ~4 MB (one reused buffer) instead of one N x Nd matrix (64 MB for a 128 x 128 SD
    # latent); measured on CPU: 4-8 MB chunks ~10% faster than 2 MB, the whole matrix ~40% slower.
    chunk = max(256, _SCORE_CHUNK_BYTES // (metric.element_size() * dst.numel() * B))
    if chunk >= N:
        best, best_idx = (metric @ d_t).max(dim=-1)
    else:
        best = metric.new_empty(B, N)
        best_idx = torch.empty(B, N, dtype=torch.int64, device=metric.device)
        buf = metric.new_empty(B, chunk, dst.numel())
        for start in range(0, N, chunk):
            stop = min(N, start + chunk)
            scores = torch.matmul(metric[:, start:stop], d_t, out=buf[:, :stop - start] if B == 1 else None)
            torch.max(scores, dim=-1, out=(best[:, start:stop], best_idx[:, start:stop]))
    best = best.index_select(1, src) / norm.index_select(1, src)
    return best, best_idx.index_select(1, src)


@torch.no_grad()
def bipartite_soft_matching_2d(
        metric: torch.Tensor,
        hw: Tuple[int, int],
        sx: int,
        sy: int,
        r: int,
        agent_r: int = 0,
        generator: Optional[torch.Generator] = None,
) -> TokenMerge:
    """Match the tokens of an h x w grid and build the ToMe merge (and AgentSD agent merge).

    Args:
        metric: (B, N, C) tokens whose cosine similarity decides the matching (ToMeSD / AgentSD: the block input).
        hw: Grid (h, w) with ``h * w == N``, tokens row-major.
        sx: dst stride along x (cell width).
        sy: dst stride along y (cell height).
        r: Tokens to merge away (capped at the number of src tokens); ``r <= 0`` gives an identity merge.
        agent_r: Tokens to merge away for the agent tokens (capped at the number of src); agents exist only if
            ``(N - agent_r) * 2 < N - r``.
        generator: CPU generator for random dst positions; ``None`` uses the top-left token of every cell.

    Returns:
        A :class:`TokenMerge`.
    """
    B, N, _ = metric.shape
    h, w = hw
    if h * w != N:
        raise ValueError(f'bipartite_soft_matching_2d: grid {h}x{w} does not match {N} tokens')
    if r <= 0:
        return TokenMerge(N)
    dst, src, inv = _partition(h, w, sx, sy, generator, metric.device)
    ns = src.numel()
    r = min(ns, r)
    agent_r = min(ns, max(agent_r, 0))
    if r <= 0:
        return TokenMerge(N)
    best, best_idx = _match(metric, dst, src)
    # Unstable like the reference; only the split at r (and agent_r) matters, ties there are measure-zero events.
    order = best.argsort(dim=-1, descending=True)
    src_sorted = src.index_select(0, order.reshape(-1)).view(B, -1)
    return TokenMerge(N, B, metric.device, dst, src_sorted, best_idx.gather(1, order), inv, r, agent_r)


def downsample_factor(latent_tokens: int, tokens: int) -> int:
    """ToMeSD's downsample of a block: ``ceil(sqrt(latent_tokens // tokens))``."""
    return int(math.ceil(math.sqrt(latent_tokens // tokens)))
