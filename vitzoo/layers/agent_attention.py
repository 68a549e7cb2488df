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
- biases are broadcast, never ``.repeat``-ed per batch, and cached per grid size when no gradient is needed;
- both softmax stages can run through ``F.scaled_dot_product_attention`` with the biases as additive float masks
  (``fused_attn=True``); the explicit path computes the same thing with materialised attention maps.

This module imports only torch.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['AgentAttention', 'agent_attention', 'resize_bias_1d', 'resize_agent_grid']


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
    if bias.shape[dim] == size:
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
        fused: Use ``F.scaled_dot_product_attention``; otherwise materialise both attention maps.
        dropout_p: Dropout on both attention maps (training only; pass 0 in eval).

    Returns:
        (B, H, N, d) output.
    """
    B, H = q.shape[:2]
    # The CPU flash kernel parallelises over (batch, head, query block); the aggregation stage has only n_a queries
    # (one block), so with fewer (batch x head) items than threads it runs on one core over all N keys — several
    # times slower than the GEMM path, which parallelises over N. Use SDPA there only when it can fill the cores.
    fused1 = fused and (q.device.type != 'cpu' or B * H >= torch.get_num_threads())
    if fused1:
        agent_v = F.scaled_dot_product_attention(agents, k, v, attn_mask=bias1, dropout_p=dropout_p, scale=scale)
    else:
        # Explicit path, in the official order: scale applied to the tokens, then bias, then softmax.
        attn = ((agents * scale) @ k.transpose(-2, -1) + bias1).softmax(dim=-1)
        if dropout_p > 0.0:
            attn = F.dropout(attn, p=dropout_p)
        agent_v = attn @ v
    if fused:
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

        if qkv_layout == 'qkv':
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        elif qkv_layout == 'q_kv':
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
            if sr_ratio > 1:
                self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
                self.norm = norm_layer(dim)
        self.attn_drop = nn.Dropout(attn_drop)
        if proj:
            self.proj = nn.Linear(dim, dim)
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
        self.init_biases()

    def init_biases(self) -> None:
        """Initialise every agent bias with trunc_normal(std=.02), as the official code."""
        for p in self._bias_params():
            _trunc_normal_(p.data, std=0.02)

    def _bias_params(self):
        names = ('an_bias', 'na_bias', 'ah_bias', 'aw_bias', 'ha_bias', 'wa_bias', 'ac_bias', 'ca_bias')
        return [getattr(self, n) for n in names if getattr(self, n) is not None]

    def _compute_biases(
            self,
            hw: Tuple[int, int],
            kv_hw: Tuple[int, int],
            dtype: torch.dtype,
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
        b1 = F.interpolate(an, size=(kh, kw), mode='bilinear', align_corners=False).reshape(1, heads, n, kh * kw)
        b1 = b1 + (resize_bias_1d(ah, kh, 3) + resize_bias_1d(aw, kw, 4)).reshape(1, heads, n, kh * kw)
        b2 = F.interpolate(na, size=(h, w), mode='bilinear', align_corners=False).reshape(1, heads, n, h * w)
        b2 = b2.transpose(-1, -2) + (resize_bias_1d(ha, h, 2) + resize_bias_1d(wa, w, 3)).reshape(1, heads, h * w, n)
        if ac is not None:
            b1 = torch.cat([ac, b1], dim=-1)
            b2 = torch.cat([ca, b2], dim=-2)
        return b1.to(dtype), b2.to(dtype)

    def get_biases(
            self,
            hw: Tuple[int, int],
            kv_hw: Optional[Tuple[int, int]] = None,
            dtype: torch.dtype = torch.float32,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Agent biases for a grid, cached per grid when no gradient flows into them.

        The cache key holds the parameters' version counters, so loading or editing weights invalidates it.

        Args:
            hw: Query token grid (h, w).
            kv_hw: Key token grid (defaults to ``hw``; smaller with spatial reduction).
            dtype: dtype of the returned biases (the attention's compute dtype).

        Returns:
            ``(bias1, bias2)`` of shapes (1, H, n, P + Mk) and (1, H, P + N, n).
        """
        kv_hw = tuple(hw) if kv_hw is None else tuple(kv_hw)
        hw = tuple(hw)
        params = self._bias_params()
        cacheable = not (torch.is_grad_enabled() and any(p.requires_grad for p in params))
        if cacheable and not torch.jit.is_scripting() and not torch.compiler.is_compiling():
            key = (hw, kv_hw, dtype, self.an_bias.device, tuple(self.agent_hw))
            versions = tuple(p._version for p in params) + tuple(p.data_ptr() for p in params)
            hit = self._bias_cache.get(key)
            if hit is not None and hit[0] == versions:
                return hit[1], hit[2]
            b1, b2 = self._compute_biases(hw, kv_hw, dtype)
            if len(self._bias_cache) > 16:  # bounded: a few grid sizes are normal, hundreds are not
                self._bias_cache.clear()
            self._bias_cache[key] = (versions, b1, b2)
            return b1, b2
        return self._compute_biases(hw, kv_hw, dtype)

    def _apply(self, fn, *args, **kwargs):
        # Moving / casting the module invalidates cached biases.
        self._bias_cache = {}
        return super()._apply(fn, *args, **kwargs)

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
        kh, kw = (h, w) if kv_hw is None else kv_hw
        if N != P + h * w or k.shape[1] != P + kh * kw:
            raise ValueError(
                f'AgentAttention: got {N} query / {k.shape[1]} key tokens, expected {P} prefix + {h}x{w} grid '
                f'and {P} prefix + {kh}x{kw} grid')
        H, d = self.num_heads, self.head_dim
        ph, pw = self.agent_hw
        # Tokens viewed as channels-last (B, C, h, w) maps: pooling and the DWC need no transposed copies.
        q_grid = q[:, P:].reshape(B, h, w, C).permute(0, 3, 1, 2)
        agents = F.adaptive_avg_pool2d(q_grid, (ph, pw)).reshape(B, H, d, ph * pw).transpose(-1, -2)
        q = q.reshape(B, N, H, d).transpose(1, 2)
        v_grid = v[:, P:]
        k = k.reshape(B, -1, H, d).transpose(1, 2)
        v = v.reshape(B, -1, H, d).transpose(1, 2)
        bias1, bias2 = self.get_biases((h, w), (kh, kw), dtype=q.dtype)
        dropout_p = self.attn_drop.p if self.training else 0.0
        x = agent_attention(q, k, v, agents, bias1, bias2, self.scale, fused=self.fused_attn, dropout_p=dropout_p)
        x = x.transpose(1, 2).reshape(B, N, C)

        v_grid = v_grid.reshape(B, kh, kw, C).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        if (kh, kw) != (h, w):
            v_grid = F.interpolate(v_grid, size=(h, w), mode='bilinear', align_corners=False)
        dwc = getattr(self, self.dwc_name)(v_grid).flatten(2).transpose(1, 2)
        if P:
            # the class token gets no DWC term
            x = torch.cat([x[:, :P], x[:, P:] + dwc], dim=1)
        else:
            x = x + dwc
        return x

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """Project, attend through the agents, add the DWC term and project out.

        Args:
            x: (B, P + h*w, C) tokens, prefix tokens first.
            hw: The token grid (h, w).
        """
        B, N, C = x.shape
        kv_hw = None
        if self.qkv_layout == 'qkv':
            q, k, v = self.qkv(x).reshape(B, N, 3, C).unbind(2)
        elif self.qkv_layout == 'q_kv':
            q = self.q(x)
            if self.sr_ratio > 1:
                if self.num_prefix_tokens:
                    raise ValueError('AgentAttention: spatial reduction does not support prefix tokens')
                x_ = self.sr(x.transpose(1, 2).reshape(B, C, *hw))
                kv_hw = tuple(x_.shape[-2:])
                x = self.norm(x_.flatten(2).transpose(1, 2))
            k, v = self.kv(x).reshape(B, -1, 2, C).unbind(2)
        else:
            raise RuntimeError("AgentAttention(qkv_layout='none') takes projected tokens: call forward_qkv")
        x = self.forward_qkv(q, k, v, hw, kv_hw)
        if self.proj is not None:
            x = self.proj_drop(self.proj(x))
        return x

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, agent_num={self.agent_num}, '
                f'window_size={self.window_size}, sr_ratio={self.sr_ratio}, prefix={self.num_prefix_tokens}, '
                f'fused_attn={self.fused_attn}')
