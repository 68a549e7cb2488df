"""Agent Attention: the one implementation shared by every vitzoo agent model and integration.

Agent Attention: On the Integration of Softmax and Linear Attention (Han et al., ECCV 2024),
https://arxiv.org/abs/2312.08874. Official code: https://github.com/LeapLabTHU/Agent-Attention.

Per head, with agent tokens A pooled from the projected queries (n_a = p*p of them):

    O = softmax(Q Aᵀ s + B2) · softmax(A Kᵀ s + B1) · V + DWC(V)

B1 / B2 are the agent biases: a 7x7 block bias (``an_bias`` / ``na_bias``) bilinearly resized to the token grid plus
row and column biases (``ah_bias + aw_bias`` / ``ha_bias + wa_bias``). A class token (DeiT) adds ``ac_bias`` (agent →
cls key) and ``ca_bias`` (cls query → agents) and gets no DWC term.

Beyond the official code:
- any token grid: the row/column biases are resized from their construction-time window to the actual grid (the
  official classification models fail with a shape error at any other resolution);
- biases are broadcast, never ``.repeat``-ed per batch, and cached per grid size when no gradient is needed and they
  are small (``AgentAttention.bias_cache_max_bytes``, 2 MiB per module: every default resolution). Larger ones (e.g.
  896² inputs: 4-15 MB per block) are rebuilt per call as the official code does — caching them would add up to
  ~130 MB of resident memory to a model for a ~1% gain, since building them costs O(H·n·N) against the attention's
  O(H·n·N·d);
- both softmax stages can run through ``F.scaled_dot_product_attention`` with the biases as additive float masks
  (``fused_attn=True``); the explicit path computes the same thing with materialised attention maps. Training on a
  CPU with trainable biases or under bf16 autocast takes the explicit path (``vitzoo.layers.sdpa.use_sdpa``: SDPA's
  CPU kernel has no mask gradient, and its reduced-precision backward is several times slower);
- the agent pooling's backward and the bilinear resize of the block biases are small GEMMs (:class:`_AdaptiveAvgPool`,
  :func:`bilinear_resize`): aten's kernels run several times slower on these channels-last views and many-channel
  7x7 maps (compiled / exported graphs keep aten's ops);
- the *factored* path (``fused_attn=True`` and few agents per channel, n·H <= C/2: the high-resolution stages of
  Agent-PVT/Swin/CSwin) never forms Q and K. Pooling commutes with the affine q projection, so the agents are
  ``A = pool(X) W_q^T + b_q``; the logits are ``Q A^T = X (A W_q)^T + b_q A^T`` and ``A K^T = (A W_k) X^T + A b_k``,
  where the last term is constant along the softmax axis and drops out. Only V (needed by the DWC anyway) is
  projected: two of the three (N x C x C) projections and their (N x C) outputs disappear, the attention is three
  GEMMs whose output width is the H·n agent logits, and the second stage accumulates straight into the DWC output.
  Under autograd with many agents (``per_head_min_agents``) the value stages run per head instead of as
  block-diagonal (H·n x C) products, whose H-fold FLOPs are then no longer hidden by memory traffic.

This module imports only torch.
"""
import contextlib
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .linear import Linear, linear
from .sdpa import use_sdpa

__all__ = ['AgentAttention', 'agent_attention', 'adaptive_avg_pool', 'bilinear_resize', 'resize_bias_1d',
           'resize_agent_grid', 'split_qkv']


def split_qkv(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """``(w_q, b_q, w_k, b_k, w_v, b_v)`` views of a fused (3C, C) q/k/v projection (biases None without bias)."""
    C = weight.shape[0] // 3
    bs = (None,) * 3 if bias is None else (bias[:C], bias[C:2 * C], bias[2 * C:])
    return weight[:C], bs[0], weight[C:2 * C], bs[1], weight[2 * C:], bs[2]


def _trunc_normal_(t: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    # Same distribution as timm's trunc_normal_(std=.02) (bounds ±2 absolute, i.e. effectively untruncated).
    return nn.init.trunc_normal_(t, std=std, a=-2.0, b=2.0)


def resize_bias_1d(bias: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Linearly resize one spatial axis of a bias tensor (align_corners=False), a no-op at the same size.

    Args:
        bias: Any tensor.
        size: New length of axis ``dim``.
        dim: The axis to resize.
    """
    # statically_known_true: under dynamic-shape tracing a symbolic size takes the (exact at equal sizes) resize
    # instead of installing a guard that would specialise the graph to the example size
    if statically_known_true(bias.shape[dim] == size):
        return bias
    x = bias.movedim(dim, -1)
    shape = x.shape
    x = F.interpolate(x.reshape(1, -1, shape[-1]).float(), size=size, mode='linear', align_corners=False)
    return x.to(bias.dtype).reshape(*shape[:-1], size).movedim(-1, dim)


def resize_agent_grid(bias: torch.Tensor, old_hw: Tuple[int, int], new_hw: Tuple[int, int], dim: int) -> torch.Tensor:
    """Bilinearly resize the agent axis of a bias from an ``old_hw`` agent grid to ``new_hw`` (dense backbones).

    Args:
        bias: Tensor whose axis ``dim`` has ``old_hw[0] * old_hw[1]`` agents.
        old_hw: Agent grid the bias was trained with.
        new_hw: Agent grid to produce.
        dim: The agent axis.
    """
    if tuple(old_hw) == tuple(new_hw):
        return bias
    x = bias.movedim(dim, -1)
    shape = x.shape
    x = x.reshape(-1, 1, *old_hw).float()
    x = F.interpolate(x, size=new_hw, mode='bilinear', align_corners=False)
    return x.to(bias.dtype).reshape(*shape[:-1], new_hw[0] * new_hw[1]).movedim(-1, dim)


def _bilinear_matrix(out: int, size: int, like: torch.Tensor) -> torch.Tensor:
    # (out, size) weights of a linear resize with align_corners=False, computed as aten's CPU kernel does (fp32)
    scale = size / out
    src = ((torch.arange(out, device=like.device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_(min=0)
    i0 = src.floor().long().clamp_(max=size - 1)
    lam = (src - i0).clamp_(0, 1)
    i1 = (i0 + 1).clamp_(max=size - 1)
    rows = torch.arange(out, device=like.device)
    m = torch.zeros(out, size, device=like.device, dtype=torch.float32)
    m.index_put_((rows, i0), 1 - lam, accumulate=True)
    m.index_put_((rows, i1), lam, accumulate=True)
    return m.to(like.dtype)


def bilinear_resize(x: torch.Tensor, size: Tuple[int, int], channels_last: bool = False) -> torch.Tensor:
    """``F.interpolate(x, size, mode='bilinear', align_corners=False)``, as two small GEMMs in eager mode.

    aten's NCHW kernel is 3-7x slower than the GEMMs on many-channel small maps such as the 7x7 agent biases, forward
    and backward. Equal up to rounding; computed in the input's dtype even under autocast, as F.interpolate is.
    Compiled / exported graphs get F.interpolate itself.

    Args:
        x: (..., H, W, C) maps if ``channels_last``, else (..., C, H, W).
        size: Output (h, w).
        channels_last: The layout of ``x`` and of the result.
    """
    h, w = size
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        if channels_last:
            x = x.movedim(-1, -3)
        y = F.interpolate(x.reshape(-1, *x.shape[-3:]), size=size, mode='bilinear', align_corners=False)
        y = y.reshape(*x.shape[:-2], h, w)
        return y.movedim(-3, -1) if channels_last else y
    dev = x.device.type
    no_autocast = torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else None
    with no_autocast or contextlib.nullcontext():
        if channels_last:
            H, W, C = x.shape[-3:]
            y = torch.matmul(_bilinear_matrix(h, H, x), x.reshape(-1, H, W * C))  # (L, h, W * C)
            y = torch.matmul(_bilinear_matrix(w, W, x), y.reshape(-1, W, C))  # (L * h, w, C)
            return y.reshape(*x.shape[:-3], h, w, C)
        H, W = x.shape[-2:]
        return _bilinear_matrix(h, H, x) @ x @ _bilinear_matrix(w, W, x).transpose(0, 1)


def _pool_bins(size: int, out: int, like: torch.Tensor) -> torch.Tensor:
    # (out, size) 0/1 membership of adaptive pooling: bin i covers [floor(i*size/out), ceil((i+1)*size/out))
    pos = torch.arange(size, device=like.device)
    i = torch.arange(out, device=like.device)
    inside = (pos >= (i * size // out)[:, None]) & (pos < (((i + 1) * size + out - 1) // out)[:, None])
    return inside.to(like.dtype)


def _pool_matrix(size: int, out: int, like: torch.Tensor) -> torch.Tensor:
    # (out, size) averaging weights of adaptive pooling
    inside = _pool_bins(size, out, like)
    return inside / inside.sum(1, keepdim=True)


class _AdaptiveAvgPool(torch.autograd.Function):
    """``F.adaptive_avg_pool2d`` whose backward is two small GEMMs writing a token-major (B, h, w, C) gradient.

    The pooled maps are channels-last views of token tensors; aten's backward kernel for them runs 5-20x slower than
    the GEMMs (e.g. 17 ms vs 0.8 ms for a batch of 8 Agent-Swin-T stage-1 maps) and returns NCHW, which the token
    layout then copies back. The bin averages are applied to the small pooled gradient, so the GEMMs multiply by exact
    0/1 matrices in any dtype; the backward is made of differentiable ops (double backward works).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, out: Tuple[int, int]) -> torch.Tensor:
        ctx.in_shape = x.shape
        return F.adaptive_avg_pool2d(x, out)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        B, C, h, w = ctx.in_shape
        ph, pw = g.shape[-2:]
        mh, mw = _pool_bins(h, ph, g), _pool_bins(w, pw, g)
        g = (g / (mh.sum(1)[:, None] * mw.sum(1)[None, :])).permute(0, 2, 3, 1)  # (B, ph, pw, C) bin means
        t = torch.matmul(mh.t(), g.reshape(B, ph, pw * C))  # (B, h, pw * C)
        gx = torch.matmul(mw.t(), t.reshape(B * h, pw, C))  # (B * h, w, C)
        return gx.reshape(B, h, w, C).permute(0, 3, 1, 2), None


def adaptive_avg_pool(x: torch.Tensor, out: Tuple[int, int]) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, out)``; as two averaging GEMMs when exporting (torch.export / ONNX).

    The ONNX exporters turn adaptive pooling into an AveragePool whose kernel is fixed at the example size, wrong for
    any other grid; the GEMM form computes the same bins for every size (equal up to summation order, ~1e-7). When a
    gradient is recorded (eager), the backward is :class:`_AdaptiveAvgPool`'s (same values, several times faster).
    """
    if torch.compiler.is_exporting():
        h, w = x.shape[-2:]
        return _pool_matrix(h, out[0], x) @ x @ _pool_matrix(w, out[1], x).transpose(0, 1)
    if torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling():
        return _AdaptiveAvgPool.apply(x, tuple(out))
    return F.adaptive_avg_pool2d(x, out)


@torch.compiler.assume_constant_result
def _num_threads() -> int:
    # torch.get_num_threads() cannot be traced by torch.compile; the thread count is fixed for a compiled graph's life
    return torch.get_num_threads()


def agent_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        agents: torch.Tensor,
        bias1: torch.Tensor,
        bias2: torch.Tensor,
        scale: float,
        fused: bool = True,
        dropout_p: float = 0.0,
) -> torch.Tensor:
    """The two-stage agent softmax, without the DWC term.

    Args:
        q: Queries (B, H, N, d).
        k: Keys (B, H, M, d).
        v: Values (B, H, M, d).
        agents: Agent tokens (B, H, n, d).
        bias1: Agent-aggregation bias, broadcastable to (B, H, n, M).
        bias2: Agent-broadcast bias, broadcastable to (B, H, N, n).
        scale: Logit scale (head_dim ** -0.5).
        fused: Use ``F.scaled_dot_product_attention`` (on a CPU only where its kernel fits: see below); otherwise
            materialise both attention maps.
        dropout_p: Dropout on both attention maps (training only; pass 0 in eval).

    Returns:
        (B, H, N, d) output.
    """
    B, H = q.shape[:2]
    # The CPU flash kernel parallelises over (batch, head, query block); the aggregation stage has only n_a queries
    # (one block), so with fewer (batch x head) items than threads it runs on one core over all N keys — several
    # times slower than the GEMM path, which parallelises over N. Use SDPA there only when it can fill the cores.
    # Training on a CPU with trainable biases or in bf16 / fp16 takes the explicit path (see use_sdpa).
    fused1 = fused and (q.device.type != 'cpu' or B * H >= _num_threads()) and use_sdpa(agents, k, v, bias1)
    if fused1:
        agent_v = F.scaled_dot_product_attention(agents, k, v, attn_mask=bias1, dropout_p=dropout_p, scale=scale)
    else:
        # Explicit path, in the official order: scale applied to the tokens, then bias, then softmax. The logits are
        # computed token-major and read transposed: k's gradient then comes out token-major too, and the fused qkv
        # projection's backward stacks q / k / v gradients of one layout (a transposed one stacks several times
        # slower); the bias goes first so that the sum is laid out agents-major for the softmax.
        attn = (bias1 + torch.matmul(k, (agents * scale).transpose(-2, -1)).transpose(-2, -1)).softmax(dim=-1)
        if dropout_p > 0.0:
            attn = F.dropout(attn, p=dropout_p)
        agent_v = attn @ v
    if fused and use_sdpa(q, agents, agent_v, bias2):
        return F.scaled_dot_product_attention(q, agents, agent_v, attn_mask=bias2, dropout_p=dropout_p, scale=scale)
    attn = ((q * scale) @ agents.transpose(-2, -1) + bias2).softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ agent_v


class AgentAttention(nn.Module):
    """Agent attention over a 2-D token grid, optionally with prefix (class) tokens.

    One class serves every family; the parameter names follow the official checkpoints:

    - ``qkv_layout='qkv'`` (DeiT, Swin): ``qkv`` = Linear(C, 3C), channel blocks q, k, v.
    - ``qkv_layout='q_kv'`` (PVT): ``q`` = Linear(C, C), ``kv`` = Linear(C, 2C) with k first; ``sr_ratio > 1`` computes
      k / v from a strided-conv + LayerNorm reduced map (``sr``, ``norm``) as PVT's spatial-reduction attention.
    - ``qkv_layout='none'`` (CSwin): projections live in the block; call :meth:`forward_qkv` with q, k, v.

    Args:
        dim: Channels C.
        num_heads: Heads H.
        agent_num: Agent count n_a (a square, p * p).
        window_size: Token grid (h, w) the row/column biases are built for (resized at run time for other grids).
        qkv_bias: Bias in the q/k/v projections.
        attn_drop: Dropout on the attention maps.
        proj_drop: Dropout after the output projection.
        qkv_layout: 'qkv', 'q_kv' or 'none'.
        sr_ratio: Spatial reduction of keys/values ('q_kv' only).
        num_prefix_tokens: 0, or 1 for a class token (adds ``ac_bias`` / ``ca_bias``).
        proj: Add the output projection ``proj`` (CSwin has it in the block).
        dwc_name: Attribute name of the depthwise conv ('dwc'; CSwin calls it 'get_v').
        kernel_size: DWC kernel size.
        norm_layer: Norm used after the spatial reduction.
        fused_attn: Use ``F.scaled_dot_product_attention`` for both softmax stages.
    """

    # Largest bias pair (bytes) kept in the per-grid cache; bigger ones are rebuilt per call (see the module docstring).
    bias_cache_max_bytes: int = 2 << 20
    # The factored path pays off when the H·n agent logits per token are few against the C channels it saves.
    factored_max_agent_ratio: float = 0.5
    # Factored path under autograd with at least this many H·n agents: per-head value GEMMs instead of the
    # block-diagonal (H·n x C) ones, whose H-fold FLOPs (and backward) stop being hidden by memory traffic there.
    # Measured: Agent-Swin-T stage 2 (H·n = 96) module fwd+bwd 1.10x, whole step 1.01-1.02x (fp32 / bf16); below,
    # the copies of the per-head layout cost more than they save (Agent-CSwin-T stage 2, H·n = 64 on 56-token stripes:
    # step 0.98-0.99x). In inference the in-place accumulation into the DWC output wins at any size.
    per_head_min_agents: int = 96

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            agent_num: int = 49,
            window_size: Tuple[int, int] = (14, 14),
            qkv_bias: bool = True,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            qkv_layout: str = 'qkv',
            sr_ratio: int = 1,
            num_prefix_tokens: int = 0,
            proj: bool = True,
            dwc_name: str = 'dwc',
            kernel_size: int = 3,
            norm_layer: type = nn.LayerNorm,
            fused_attn: bool = True,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'AgentAttention: dim {dim} must be divisible by num_heads {num_heads}')
        pool = int(round(agent_num ** 0.5))
        if pool * pool != agent_num:
            raise ValueError(f'AgentAttention: agent_num must be a square number, got {agent_num}')
        if qkv_layout not in ('qkv', 'q_kv', 'none'):
            raise ValueError(f"AgentAttention: qkv_layout must be 'qkv', 'q_kv' or 'none', got {qkv_layout!r}")
        if sr_ratio > 1 and qkv_layout != 'q_kv':
            raise ValueError("AgentAttention: sr_ratio > 1 needs qkv_layout='q_kv'")
        if num_prefix_tokens not in (0, 1):
            raise ValueError(f'AgentAttention: num_prefix_tokens must be 0 or 1, got {num_prefix_tokens}')
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.agent_num = agent_num
        self.agent_hw = (pool, pool)  # may be changed at run time (dense backbones); biases are then resized
        self.window_size = tuple(window_size)
        self.qkv_layout = qkv_layout
        self.sr_ratio = sr_ratio
        self.num_prefix_tokens = num_prefix_tokens
        self.dwc_name = dwc_name
        self.fused_attn = fused_attn
        self.factored: Optional[bool] = None  # None: automatic (see use_factored); True / False force it

        if qkv_layout == 'qkv':
            self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        elif qkv_layout == 'q_kv':
            self.q = Linear(dim, dim, bias=qkv_bias)
            self.kv = Linear(dim, dim * 2, bias=qkv_bias)
            if sr_ratio > 1:
                self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
                self.norm = norm_layer(dim)
        self.attn_drop = nn.Dropout(attn_drop)
        if proj:
            self.proj = Linear(dim, dim)
            self.proj_drop = nn.Dropout(proj_drop)
        else:
            self.proj = None
            self.proj_drop = None
        setattr(self, dwc_name, nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim))

        h, w = self.window_size
        kh, kw = h // sr_ratio, w // sr_ratio
        n = agent_num
        self.an_bias = nn.Parameter(torch.zeros(num_heads, n, 7, 7))
        self.na_bias = nn.Parameter(torch.zeros(num_heads, n, 7, 7))
        self.ah_bias = nn.Parameter(torch.zeros(1, num_heads, n, kh, 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, num_heads, n, 1, kw))
        self.ha_bias = nn.Parameter(torch.zeros(1, num_heads, h, 1, n))
        self.wa_bias = nn.Parameter(torch.zeros(1, num_heads, 1, w, n))
        if num_prefix_tokens:
            self.ac_bias = nn.Parameter(torch.zeros(1, num_heads, n, 1))
            self.ca_bias = nn.Parameter(torch.zeros(1, num_heads, 1, n))
        else:
            self.ac_bias = None
            self.ca_bias = None
        self._bias_cache: Dict[tuple, Tuple[tuple, torch.Tensor, torch.Tensor]] = {}
        self._mask_cache: Dict[tuple, torch.Tensor] = {}
        self.init_biases()

    def init_biases(self) -> None:
        """Initialise every agent bias with trunc_normal(std=.02), as the official code."""
        for p in self._bias_params():
            _trunc_normal_(p.data, std=0.02)

    # spatial axis of each row/column bias (the axis sized by the token grid the biases were built for)
    ROW_COL_BIAS_AXES = {'ah_bias': 3, 'aw_bias': 4, 'ha_bias': 2, 'wa_bias': 3}

    def adapt_state_dict(self, state_dict: Dict[str, torch.Tensor], prefix: str = '') -> None:
        """Fit this module's tensors of a checkpoint (keys under ``prefix``) to its geometry, in place.

        The one checkpoint adaptation of agent attention, used by every family's ``checkpoint_filter_fn`` and so by
        the mm backbones: row/column biases trained on another token grid (another resolution or window) are resized
        linearly along their spatial axis, as at run time. Tensors that differ anywhere else are left as they are,
        for the family's key check to report.

        Args:
            state_dict: Checkpoint with this model's key names (changed in place).
            prefix: This module's name in the model, with a trailing dot.
        """
        for name, dim in self.ROW_COL_BIAS_AXES.items():
            k = prefix + name
            v = state_dict.get(k)
            own = getattr(self, name).shape
            if v is None or v.shape == own or v.ndim != len(own):
                continue
            if all(a == b for i, (a, b) in enumerate(zip(v.shape, own)) if i != dim):
                state_dict[k] = resize_bias_1d(v, own[dim], dim)

    def _bias_params(self):
        names = ('an_bias', 'na_bias', 'ah_bias', 'aw_bias', 'ha_bias', 'wa_bias', 'ac_bias', 'ca_bias')
        return [getattr(self, n) for n in names if getattr(self, n) is not None]

    def _compute_biases(
            self,
            hw: Tuple[int, int],
            kv_hw: Tuple[int, int],
            dtype: torch.dtype,
            agents_major: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Build B1 (1, H, n, P + Mk) and B2 (1, H, P + N, n) for a query grid ``hw`` and key grid ``kv_hw``."""
        heads, n = self.num_heads, self.agent_num
        an, na, ah, aw, ha, wa = self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias
        ac, ca = self.ac_bias, self.ca_bias
        if tuple(self.agent_hw) != (int(n ** 0.5),) * 2:
            # Dense backbones may pool a different agent grid than the one trained: resize the agent axis.
            old, new = (int(n ** 0.5),) * 2, tuple(self.agent_hw)
            an, na = resize_agent_grid(an, old, new, 1), resize_agent_grid(na, old, new, 1)
            ah, aw = resize_agent_grid(ah, old, new, 2), resize_agent_grid(aw, old, new, 2)
            ha, wa = resize_agent_grid(ha, old, new, 4), resize_agent_grid(wa, old, new, 4)
            if ac is not None:
                ac, ca = resize_agent_grid(ac, old, new, 2), resize_agent_grid(ca, old, new, 3)
            n = new[0] * new[1]
        h, w = hw
        kh, kw = kv_hw
        b1 = bilinear_resize(an, (kh, kw))
        # B2 token-major (1, H, P + N, n): the layout the attention reads, straight from the resize
        b2 = bilinear_resize(na.permute(0, 2, 3, 1), (h, w), channels_last=True).flatten(1, 2)
        b1 = b1.reshape(1, heads, n, kh * kw)
        b1 = b1 + (resize_bias_1d(ah, kh, 3) + resize_bias_1d(aw, kw, 4)).reshape(1, heads, n, kh * kw)
        b2 = b2.reshape(1, heads, h * w, n) + (resize_bias_1d(ha, h, 2) + resize_bias_1d(wa, w, 3)).reshape(
            1, heads, h * w, n)
        if ac is not None:
            b1 = torch.cat([ac, b1], dim=-1)
            b2 = torch.cat([ca, b2], dim=-2)
        if agents_major:
            b2 = b2.transpose(-1, -2).reshape(1, heads * n, -1)
        return b1.to(dtype), b2.to(dtype)

    def get_biases(
            self,
            hw: Tuple[int, int],
            kv_hw: Optional[Tuple[int, int]] = None,
            dtype: torch.dtype = torch.float32,
            agents_major: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Agent biases for a grid, cached per grid when no gradient flows into them.

        The cache key holds the parameters' version counters, so loading or editing weights invalidates it.

        Args:
            hw: Query token grid (h, w).
            kv_hw: Key token grid (defaults to ``hw``; smaller with spatial reduction).
            dtype: dtype of the returned biases (the attention's compute dtype).
            agents_major: Return bias2 as a contiguous (1, H * n, P + N) tensor (the factored path's logits layout).

        Returns:
            ``(bias1, bias2)`` of shapes (1, H, n, P + Mk) and (1, H, P + N, n) (or (1, H * n, P + N)).
        """
        kv_hw = tuple(hw) if kv_hw is None else tuple(kv_hw)
        hw = tuple(hw)
        params = self._bias_params()
        cacheable = not (torch.is_grad_enabled() and any(p.requires_grad for p in params))
        if cacheable and not torch.jit.is_scripting() and not torch.compiler.is_compiling():
            key = (hw, kv_hw, dtype, self.an_bias.device, tuple(self.agent_hw), agents_major)
            versions = tuple(p._version for p in params) + tuple(p.data_ptr() for p in params)
            hit = self._bias_cache.get(key)
            if hit is not None and hit[0] == versions:
                return hit[1], hit[2]
            b1, b2 = self._compute_biases(hw, kv_hw, dtype, agents_major)
            if (b1.numel() + b2.numel()) * b1.element_size() > self.bias_cache_max_bytes:
                return b1, b2
            if len(self._bias_cache) > 16:  # bounded: a few grid sizes are normal, hundreds are not
                self._bias_cache.clear()
            self._bias_cache[key] = (versions, b1, b2)
            return b1, b2
        return self._compute_biases(hw, kv_hw, dtype, agents_major)

    def _apply(self, fn, *args, **kwargs):
        # Moving / casting the module invalidates cached biases.
        self._bias_cache = {}
        return super()._apply(fn, *args, **kwargs)

    def _check_tokens(
            self,
            n_q: int,
            n_k: int,
            hw: Tuple[int, int],
            kv_hw: Optional[Tuple[int, int]],
    ) -> Tuple[int, int]:
        """The key grid; a ValueError naming both counts when the tokens do not fit the grids."""
        P = self.num_prefix_tokens
        h, w = hw
        kh, kw = (h, w) if kv_hw is None else kv_hw
        if n_q != P + h * w or n_k != P + kh * kw:
            raise ValueError(
                f'AgentAttention: got {n_q} query / {n_k} key tokens, expected {P} prefix + {h}x{w} grid '
                f'and {P} prefix + {kh}x{kw} grid')
        return kh, kw

    def forward_qkv(
            self,
            q: torch.Tensor,
            k: torch.Tensor,
            v: torch.Tensor,
            hw: Tuple[int, int],
            kv_hw: Optional[Tuple[int, int]] = None,
    ) -> torch.Tensor:
        """Agent attention on projected tokens (before the output projection).

        Args:
            q: (B, P + h*w, C) projected queries, prefix tokens first.
            k: (B, P + kh*kw, C) projected keys.
            v: (B, P + kh*kw, C) projected values.
            hw: Query grid (h, w).
            kv_hw: Key/value grid (defaults to ``hw``).

        Returns:
            (B, P + h*w, C), including the DWC term on the grid tokens.
        """
        B, N, C = q.shape
        P = self.num_prefix_tokens
        h, w = hw
        kh, kw = self._check_tokens(N, k.shape[1], hw, kv_hw)
        H, d = self.num_heads, self.head_dim
        ph, pw = self.agent_hw
        # Tokens viewed as channels-last (B, C, h, w) maps: pooling and the DWC need no transposed copies.
        q_grid = q[:, P:].reshape(B, h, w, C).permute(0, 3, 1, 2)
        agents = adaptive_avg_pool(q_grid, (ph, pw)).reshape(B, H, d, ph * pw).transpose(-1, -2)
        q = q.reshape(B, N, H, d).transpose(1, 2)
        v_grid = v[:, P:]
        k = k.reshape(B, -1, H, d).transpose(1, 2)
        v = v.reshape(B, -1, H, d).transpose(1, 2)
        bias1, bias2 = self.get_biases((h, w), (kh, kw), dtype=q.dtype)
        dropout_p = self.attn_drop.p if self.training else 0.0
        x = agent_attention(q, k, v, agents, bias1, bias2, self.scale, fused=self.fused_attn, dropout_p=dropout_p)
        x = x.transpose(1, 2).reshape(B, N, C)

        v_grid = v_grid.reshape(B, kh, kw, C).permute(0, 3, 1, 2)
        if not (torch.is_grad_enabled() and v_grid.requires_grad):
            # A dense channels-last copy for the conv. Not when training: the conv saves its input for the weight
            # gradient, and a copy would be one (B, C, h, w) tensor per block more; the view shares the projection
            # output, which the agent pooling keeps alive anyway.
            v_grid = v_grid.contiguous(memory_format=torch.channels_last)
        if (kh, kw) != (h, w):
            v_grid = F.interpolate(v_grid, size=(h, w), mode='bilinear', align_corners=False)
        dwc = getattr(self, self.dwc_name)(v_grid).flatten(2).transpose(1, 2)
        if P:
            # the class token gets no DWC term. Zero rows padded onto the DWC, not slices of x: the backward of a
            # slice zero-fills and copies a whole (B, N, C) gradient, the padding's backward is a view
            dwc = F.pad(dwc, (0, 0, P, 0))
        return x + dwc

    def use_factored(self) -> bool:
        """Whether :meth:`attend` takes the factored path (see the module docstring)."""
        if not self.fused_attn or self.factored is False:
            return False
        if self.training and self.attn_drop.p > 0.0:
            return False  # dropped attention rows no longer sum to one: the V bias would not pass through
        if self.factored:
            return True
        ph, pw = self.agent_hw
        return ph * pw * self.num_heads <= self.factored_max_agent_ratio * self.dim

    def split_weights(self) -> Tuple[Optional[torch.Tensor], ...]:
        """``(w_q, b_q, w_k, b_k, w_v, b_v)`` views of this module's projections (biases may be None)."""
        C = self.dim
        if self.qkv_layout == 'qkv':
            return split_qkv(self.qkv.weight, self.qkv.bias)
        if self.qkv_layout == 'q_kv':
            w, b = self.kv.weight, self.kv.bias
            bk, bv = (None, None) if b is None else (b[:C], b[C:])
            return self.q.weight, self.q.bias, w[:C], bk, w[C:], bv
        raise RuntimeError("AgentAttention(qkv_layout='none') has no projections: pass the weights to attend()")

    def attend(
            self,
            x: torch.Tensor,
            hw: Tuple[int, int],
            weights: Tuple[Optional[torch.Tensor], ...],
            x_kv: Optional[torch.Tensor] = None,
            kv_hw: Optional[Tuple[int, int]] = None,
    ) -> torch.Tensor:
        """Agent attention of un-projected tokens, given the q/k/v projection weights (before the output projection).

        Args:
            x: (B, P + h*w, C) tokens the queries are projected from, prefix tokens first.
            hw: Query grid (h, w).
            weights: ``(w_q, b_q, w_k, b_k, w_v, b_v)``, each weight (C, C), biases (C,) or None.
            x_kv: Tokens the keys/values are projected from (defaults to ``x``; spatially reduced for PVT).
            kv_hw: Grid of ``x_kv`` (defaults to ``hw``).

        Returns:
            (B, P + h*w, C), including the DWC term on the grid tokens.
        """
        x_kv = x if x_kv is None else x_kv
        wq, bq, wk, bk, wv, bv = weights
        if self.use_factored():
            return self._forward_factored(x, x_kv, hw, kv_hw, wq, bq, wk, wv, bv)
        q = linear(x, wq, bq)
        k = linear(x_kv, wk, bk)
        v = linear(x_kv, wv, bv)
        return self.forward_qkv(q, k, v, hw, kv_hw)

    def _forward_factored(
            self,
            x: torch.Tensor,
            x_kv: torch.Tensor,
            hw: Tuple[int, int],
            kv_hw: Optional[Tuple[int, int]],
            wq: torch.Tensor,
            bq: Optional[torch.Tensor],
            wk: torch.Tensor,
            wv: torch.Tensor,
            bv: Optional[torch.Tensor],
    ) -> torch.Tensor:
        B, N, C = x.shape
        P = self.num_prefix_tokens
        h, w = hw
        Nk = x_kv.shape[1]
        kh, kw = self._check_tokens(N, Nk, hw, kv_hw)
        H, d, s = self.num_heads, self.head_dim, self.scale
        ph, pw = self.agent_hw
        n = ph * pw
        # agents: pooling commutes with the affine q projection (its weights sum to one)
        x_grid = x[:, P:].reshape(B, h, w, C).permute(0, 3, 1, 2)
        agents = linear(adaptive_avg_pool(x_grid, (ph, pw)).flatten(2).transpose(1, 2), wq, bq)
        a = agents.view(B, n, H, d).transpose(1, 2)  # (B, H, n, d)
        # (A_h W_h) s for keys and queries: the logits come straight from the un-projected tokens. They are kept
        # agents-major (B, H*n, tokens): the stage-2 softmax across rows then vectorises over tokens (over 9
        # contiguous values it would not: ~10x slower on CPU).
        wkq = torch.stack([wk.view(H, d, C), wq.view(H, d, C)], dim=1)  # (H, 2, d, C)
        m = torch.matmul(a.unsqueeze(2), wkq).mul_(s)  # (B, H, 2, n, C)
        m_k, m_q = m[:, :, 0].reshape(B, H * n, C), m[:, :, 1].reshape(B, H * n, C)
        bias1, bias2 = self.get_biases((h, w), (kh, kw), dtype=x.dtype, agents_major=True)
        bias1 = bias1.reshape(1, H * n, Nk)
        if x_kv is x:
            # one GEMM (one pass over the tokens) for both stages' logits
            logits = torch.bmm(torch.cat([m_k, m_q], dim=1), x.transpose(1, 2))
            l1, l2 = logits[:, :H * n].add_(bias1), logits[:, H * n:].add_(bias2)
        else:
            l1 = torch.baddbmm(bias1, m_k, x_kv.transpose(1, 2))
            l2 = torch.baddbmm(bias2, m_q, x.transpose(1, 2))
        if bq is not None:
            # b_q A^T varies along the stage-2 softmax axis (per batch and agent), so it stays
            l2 = l2.add_(torch.matmul(a, bq.view(H, d, 1)).mul_(s).view(B, H * n, 1))
        # stage 1: agents aggregate V over all tokens (A b_k is constant along the softmax axis: dropped)
        v = linear(x_kv, wv, bv)
        p1 = l1.softmax(dim=-1)
        # stage 2: every token reads the agents
        p2 = l2.reshape(B, H, n, N).softmax(dim=2)
        v_grid = v[:, P:].reshape(B, kh, kw, C).permute(0, 3, 1, 2)
        if (kh, kw) != (h, w):
            v_grid = F.interpolate(v_grid.contiguous(memory_format=torch.channels_last), size=(h, w),
                                   mode='bilinear', align_corners=False)
        dwc = getattr(self, self.dwc_name)(v_grid)
        if H > 1 and H * n >= self.per_head_min_agents and torch.is_grad_enabled() and v.requires_grad:
            agent_v = torch.matmul(p1.view(B, H, n, Nk), v.view(B, Nk, H, d).transpose(1, 2))  # (B, H, n, d)
            out = torch.matmul(p2.transpose(-1, -2), agent_v).transpose(1, 2)  # (B, N, H, d) view
            if P == 0:  # the sum lands token-major straight away
                return torch.add(dwc.permute(0, 2, 3, 1).reshape(B, N, H, d), out).view(B, N, C)
            out = out.reshape(B, N, C)
        else:
            agent_v = torch.bmm(p1, v)  # (B, H*n, C): head h's agents only need its own d channels
            if H > 1:
                agent_v = agent_v * self._block_diagonal(H, n, d, agent_v)
            p2 = p2.view(B, H * n, N).transpose(1, 2)
            if P == 0 and dwc.is_contiguous(memory_format=torch.channels_last):
                # accumulate the attention output into the (token-major) DWC output: no extra (N x C) tensor
                return dwc.permute(0, 2, 3, 1).reshape(B, N, C).baddbmm_(p2, agent_v)
            out = torch.bmm(p2, agent_v)
        out[:, P:] += dwc.flatten(2).transpose(1, 2)
        return out

    def _block_diagonal(self, H: int, n: int, d: int, like: torch.Tensor) -> torch.Tensor:
        """(H*n, H*d) 0/1 mask of the head-diagonal blocks, cached per device/dtype."""
        key = (H, n, d, like.device, like.dtype)
        mask = self._mask_cache.get(key)
        if mask is None:
            mask = torch.block_diag(*[like.new_ones(n, d)] * H)
            self._mask_cache = {key: mask}
        return mask

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """Project, attend through the agents, add the DWC term and project out.

        Args:
            x: (B, P + h*w, C) tokens, prefix tokens first.
            hw: The token grid (h, w).
        """
        B, N, C = x.shape
        if self.qkv_layout == 'none':
            raise RuntimeError("AgentAttention(qkv_layout='none') takes projected tokens: call forward_qkv or attend")
        x_kv, kv_hw = x, None
        if self.sr_ratio > 1:
            if self.num_prefix_tokens:
                raise ValueError('AgentAttention: spatial reduction does not support prefix tokens')
            x_ = self.sr(x.transpose(1, 2).reshape(B, C, *hw))
            kv_hw = tuple(x_.shape[-2:])
            x_kv = self.norm(x_.flatten(2).transpose(1, 2))
        if self.use_factored():
            x = self.attend(x, hw, self.split_weights(), x_kv, kv_hw)
        elif self.qkv_layout == 'qkv':
            q, k, v = self.qkv(x).reshape(B, N, 3, C).unbind(2)
            x = self.forward_qkv(q, k, v, hw, kv_hw)
        else:
            q = self.q(x)
            k, v = self.kv(x_kv).reshape(B, -1, 2, C).unbind(2)
            x = self.forward_qkv(q, k, v, hw, kv_hw)
        if self.proj is not None:
            x = self.proj_drop(self.proj(x))
        return x

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, agent_num={self.agent_num}, '
                f'window_size={self.window_size}, sr_ratio={self.sr_ratio}, prefix={self.num_prefix_tokens}, '
                f'fused_attn={self.fused_attn}')
