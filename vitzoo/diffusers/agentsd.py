"""AgentSD on diffusers UNets through attention processors (SD 1.x, SD 2.x, SDXL).

Agent Attention: On the Integration of Softmax and Linear Attention (Han et al., ECCV 2024),
https://arxiv.org/abs/2312.08874; official AgentSD: https://github.com/LeapLabTHU/Agent-Attention (``agentsd/``),
itself a modified copy of ToMeSD (https://github.com/dbolya/tomesd).

What runs in every patched self-attention (``attn1`` of a ``BasicTransformerBlock`` at downsample <= max_downsample):

1. the block input ``x`` (the merge metric, recorded by a block pre-hook) is matched by bipartite soft matching over
   sx x sy cells (``vitzoo.layers.token_merging``): ``r = int(N * ratio)`` tokens are merged away; the agent tokens
   are a second merge of the same matching with ``agent_r = min(#src, int(N * agent_ratio))``;
2. the attention input (``norm1(x)``) is merged to N - r tokens and, when ``2 * #agents < N - r``, to the agents;
3. per head, with ``s`` the attention's scale (dim_head ** -0.5), Q, K, V from the merged tokens and A = to_q(agents):
   ``O = to_out(softmax(Q Aᵀ · s ** k_scale2) · softmax(A Kᵀ · s) · V + k_shortcut · V)``; without agents the
   merged tokens get plain softmax attention (this is also the tomesd-equivalent mode, ``agent_ratio=0``);
4. ``O`` is unmerged to N tokens; the block adds it to ``x`` as usual.

The latent size is recorded by a pre-hook on the UNet and the exact token grid by pre-hooks on every
``Transformer2DModel``; nothing swaps a class, so LoRA / PEFT-wrapped projections, IP-Adapter or other processors on
``attn2``, and later diffusers changes to the block forward keep working.

Fixed defects of the official code (LeapLabTHU/Agent-Attention ``agentsd/``):

- diffusers support at all (its diffusers path raises a ``TypeError``: official issue #18) - here processors + hooks;
- ``remove_patch`` restores every processor object exactly, so outputs are bit-identical to a never-patched model
  (the original left the attention classes swapped and grew the class chain on every apply);
- ``ratio=0`` is a no-op (the original split the batch dimension in two, silently);
- ``seed=...`` makes the random dst positions deterministic and independent of the global RNG: the private CPU
  generator is re-seeded from (seed, timestep) at every UNet call, so repeated generations are reproducible too
  (the original forks the global RNG; ``seed=None`` keeps that behaviour);
- half precision: the merge metric and the merge sums are computed in fp32; the fused path uses SDPA (fp32 softmax
  accumulation); ``attn_precision='fp32'`` computes both agent softmax stages *and* the non-agent fallback in fp32
  (the original's fallback ignored it); the explicit path always uses an fp32 softmax for half inputs;
- ``merge_crossattn=True`` merges the cross-attention queries with plain ToMe (the original passed the agent tokens to
  cross-attention too, where ``k_shortcut · V`` has the text length and fails);
- attention masks on ``attn1``, 4-D inputs, ``spatial_norm`` / ``group_norm`` attentions and blocks above
  ``max_downsample`` fall back to the original processor (the original printed "Mask not supported" and ignored it).

Speed (CPU and GPU alike): the matching never normalises or gathers the N x C metric and scores in cache-sized
chunks, merge is two row gathers and one ``index_add_``, unmerge one ``index_select`` (see ``token_merging``); the
output projection runs on the merged tokens; when
``to_q / to_k / to_v`` are plain ``nn.Linear`` (no LoRA / PEFT wrapper, no hooks) and no gradient is needed, they
run as one cached batched GEMM per image, written head-major for SDPA, whose q rows carry the
``s ** (k_scale2 - 1)`` temperature; the ``k_shortcut · V`` add writes token-major, so merging the heads is free.
On the CPU the large scratch tensors (merged tokens, q/k/v, head outputs, merged projection: ~85 MB per image at a
128x128 latent) live in a ``Workspace`` shared by the processors of one patch: fresh allocations of that size are
mmapped and page-faulted on every call, which cost 5-10% of the patched call (freed by ``remove_patch``).
``tools/bench_agentsd.py`` measures it. At a 128x128 latent (SD-1.5 level 1, 16384 tokens; 9831 merged tokens and
1024 agents, the agent count being bounded below by the 1024 dst cells) the patched call is 44.8 GFLOP against the
default's 357 (two agent softmax stages 25.8, the matching 10.7, projections 8.3): a 7.97x FLOP ratio; measured
8.2-8.5x, because the matching and projection GEMMs run faster (~380 GFLOP/s) than one big SDPA (~240 GFLOP/s).

Limitations: ``use_rand=True`` with gradient checkpointing re-draws the dst positions in the recomputation (use
``use_rand=False`` when training through the patch); SDXL has no attention at full latent resolution, so it needs
``max_downsample=2`` to be patched at all (a warning says so).
"""
import logging
import math
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitzoo.layers.agent_attention import agent_attention
from vitzoo.layers.token_merging import TokenMerge, bipartite_soft_matching_2d, downsample_factor
from vitzoo.layers.workspace import Workspace, scratch

try:  # diffusers >= 0.27: a PipelineCallback subclass also works inside MultiPipelineCallbacks
    from diffusers.callbacks import PipelineCallback as _CallbackBase
except ImportError:  # pragma: no cover
    _CallbackBase = object

__all__ = [
    'apply_patch', 'remove_patch', 'update_patch', 'is_patched', 'patch_info', 'AgentSDSchedule',
    'AgentSDAttnProcessor', 'agentsd_attention', 'agentsd_self_attention', 'RECOMMENDED_EARLY', 'RECOMMENDED_LATE',
]

_logger = logging.getLogger(__name__)

#: The official README schedule (SD 1.5, 50 PLMS steps): steps 0-19 ...
RECOMMENDED_EARLY = dict(sx=4, sy=4, ratio=0.4, agent_ratio=0.95)
#: ... and steps >= 20 (no agent tokens at 64x64: (4096 - 2048) * 2 >= 2458, i.e. plain ToMe at 40 %).
RECOMMENDED_LATE = dict(sx=2, sy=2, ratio=0.4, agent_ratio=0.5)

_STATE_ATTR = '_agentsd_state'
_HALF = (torch.float16, torch.bfloat16)
# settings update_patch / the schedule may change between calls (the rest needs hooks or is fixed by apply_patch)
_RUNTIME_KEYS = ('ratio', 'agent_ratio', 'sx', 'sy', 'max_downsample', 'k_scale2', 'k_shortcut', 'attn_precision',
                 'use_rand')


def _isinstance_str(obj: Any, name: str) -> bool:
    """Class-name check through the MRO (no import of the exact diffusers module path)."""
    return any(c.__name__ == name for c in type(obj).__mro__)


# ----------------------------------------------------------------------------------------------------------------------
# the math


def agentsd_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        agents: torch.Tensor,
        scale: float,
        k_scale2: float = 0.3,
        k_shortcut: float = 0.075,
        fused: bool = True,
) -> torch.Tensor:
    """AgentSD attention on head-split tensors: ``softmax(Q Aᵀ s^k_scale2) softmax(A Kᵀ s) V + k_shortcut V``.

    Args:
        q: Queries (B, H, M, d).
        k: Keys (B, H, M, d).
        v: Values (B, H, M, d).
        agents: Projected agent tokens (B, H, n, d).
        scale: The attention scale ``s`` (dim_head ** -0.5).
        k_scale2: Exponent of the scale in the query -> agent softmax (a temperature: s ** 0.3 = dim_head ** -0.15).
        k_shortcut: Weight of the V shortcut that replaces the (untrained) DWC term.
        fused: Use ``F.scaled_dot_product_attention`` for both stages.

    Returns:
        (B, H, M, d).
    """
    # vitzoo's two-stage softmax uses one scale for both stages: fold s ** (k_scale2 - 1) into the queries so the
    # second stage sees Q Aᵀ s ** k_scale2.
    return _agent_core(q * scale ** (k_scale2 - 1.0), k, v, agents, scale, k_shortcut, fused)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _agent_core(
        q_scaled: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        agents: torch.Tensor,
        scale: float,
        k_shortcut: float,
        fused: bool,
        workspace: Optional[Workspace] = None,
) -> torch.Tensor:
    """``agent_attention`` on queries already multiplied by ``s ** (k_scale2 - 1)``, plus ``k_shortcut · V``."""
    bias = None if fused else q_scaled.new_zeros(())  # AgentSD has no agent biases (training-free)
    out = agent_attention(q_scaled, k, v, agents, bias, bias, scale, fused=fused)
    if _needs_grad(q_scaled, k, v, agents):
        return out + k_shortcut * v
    # token-major result: the caller's merge of the heads is then a free view
    B, H, M, d = out.shape
    res = scratch(workspace, 'attn.heads', (B, M, H, d), out)
    return torch.add(out, v, alpha=k_shortcut, out=res.transpose(1, 2))


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, fused: bool) -> torch.Tensor:
    if fused:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def _plain_linear(m: nn.Module) -> bool:
    """An unwrapped ``nn.Linear`` (no LoRA / PEFT wrapper, no hooks): safe to fuse with its siblings."""
    return type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks


def _fused_qkv_weight(
        attn: nn.Module,
        q_mult: float,
        cache: Optional[dict],
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Head-major (3H, C, d) weight of [q_mult · W_q; W_k; W_v] and (3H, 1, d) bias, cached per weight version."""
    mods = (attn.to_q, attn.to_k, attn.to_v)
    params = [t for m in mods for t in (m.weight, m.bias) if t is not None]
    key = (q_mult,) + tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in params)
    if cache is not None and cache.get('key') == key:
        return cache['w'], cache['b']
    heads = attn.heads
    d = attn.to_k.out_features // heads
    with torch.no_grad():
        w = torch.cat([attn.to_q.weight * q_mult, attn.to_k.weight, attn.to_v.weight])
        w = w.view(3 * heads, d, -1).transpose(1, 2).contiguous()
        b = None
        if any(m.bias is not None for m in mods):
            b = torch.cat([(m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)) * (
                q_mult if m is attn.to_q else 1.0) for m in mods]).view(3 * heads, 1, d)
    if cache is not None:
        cache.update(key=key, w=w, b=b)
    return w, b


def _project_qkv(
        attn: nn.Module,
        x: torch.Tensor,
        q_mult: float,
        compute_dtype: torch.dtype,
        cache: Optional[dict],
        workspace: Optional[Workspace] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Head-split (B, H, M, d) views of q, k, v, q optionally pre-multiplied; the last item says whether it was."""
    B, M, _ = x.shape
    heads = attn.heads
    mods = (attn.to_q, attn.to_k, attn.to_v)
    fusable = (all(_plain_linear(m) for m in mods) and len({m.in_features for m in mods}) == 1
               and getattr(attn, 'norm_q', None) is None and getattr(attn, 'norm_k', None) is None
               and not _needs_grad(x, *[m.weight for m in mods]))
    if fusable:
        # q, k and v of every head as one batched GEMM per image (q pre-scaled through its weight), written
        # head-major: SDPA's CPU kernel is ~10% faster on contiguous (M, d) rows than on the strided head views of a
        # token-major (M, 3C) projection, and the layout costs nothing here (a copy to it would cost more than it
        # saves).
        w, b = _fused_qkv_weight(attn, q_mult, cache)
        qkv = scratch(workspace, 'attn.qkv', (B, w.shape[0], M, w.shape[-1]), x)
        for i in range(B):
            torch.matmul(x[i:i + 1], w, out=qkv[i])
        if b is not None:
            qkv.add_(b)
        q, k, v = qkv.to(compute_dtype).view(B, 3, heads, M, -1).unbind(1)
        return q, k, v, True
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    d = k.shape[-1] // heads
    q, k, v = (t.view(B, M, heads, d).transpose(1, 2) for t in (q, k, v))
    if getattr(attn, 'norm_q', None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, 'norm_k', None) is not None:
        k = attn.norm_k(k)
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    return q, k, v, False


def _project_out(proj: nn.Module, x: torch.Tensor, workspace: Optional[Workspace]) -> torch.Tensor:
    """``proj(x)``; a plain ``nn.Linear`` writes into the workspace (``addmm``, as ``F.linear`` computes it)."""
    if workspace is None or not _plain_linear(proj):
        return proj(x)
    x2 = x.reshape(-1, x.shape[-1])
    out = workspace.get('attn.proj', (x2.shape[0], proj.out_features), x2)
    if proj.bias is None:
        torch.mm(x2, proj.weight.t(), out=out)
    else:
        torch.addmm(proj.bias, x2, proj.weight.t(), out=out)
    return out.view(*x.shape[:-1], proj.out_features)


def agentsd_self_attention(
        attn: nn.Module,
        hidden_states: torch.Tensor,
        token_merge: TokenMerge,
        k_scale2: float = 0.3,
        k_shortcut: float = 0.075,
        attn_precision: Optional[str] = None,
        fused: bool = True,
        cache: Optional[dict] = None,
        workspace: Optional[Workspace] = None,
) -> torch.Tensor:
    """One AgentSD self-attention call of a diffusers ``Attention``: merge, attend (agents or plain), project, unmerge.

    Args:
        attn: A diffusers ``Attention`` (uses ``to_q/to_k/to_v/to_out``, ``heads``, ``scale``, ``norm_q/norm_k``,
            ``residual_connection``, ``rescale_output_factor``).
        hidden_states: (B, N, C) attention input (``norm1(x)`` in a transformer block).
        token_merge: The block's matching (``bipartite_soft_matching_2d`` on the block input).
        k_scale2: Query -> agent temperature exponent.
        k_shortcut: V shortcut weight (agent path only).
        attn_precision: ``'fp32'`` computes the attention (agent and plain) in fp32.
        fused: SDPA (True) or explicit softmax attention.
        cache: Optional dict for the concatenated q/k/v weight (the processor keeps one per attention).
        workspace: Optional scratch tensors reused across calls (CPU, no-grad only; the processors of one patch share
            one): the merged tokens, q/k/v, the head outputs and the merged output projection.

    Returns:
        (B, N, C) attention output (before the block's residual add).
    """
    B = hidden_states.shape[0]
    dtype = hidden_states.dtype
    if token_merge.is_identity or torch.is_grad_enabled():
        workspace = None  # nothing may alias the returned tensor or a tensor saved for backward
    x, agent_tokens = token_merge.merge(hidden_states, with_agents=True, workspace=workspace)
    # fp32 on request (SD 2.1) and, for half inputs, always on the explicit path (its softmax is materialised)
    upcast = attn_precision == 'fp32' or (not fused and dtype in _HALF)
    compute_dtype = torch.float32 if upcast else dtype
    scale = attn.scale
    q_mult = scale ** (k_scale2 - 1.0) if agent_tokens is not None else 1.0
    q, k, v, premultiplied = _project_qkv(attn, x, q_mult, compute_dtype, cache, workspace)
    if agent_tokens is not None:
        a = attn.to_q(agent_tokens)
        heads, d = q.shape[1], q.shape[-1]
        a = a.view(B, -1, heads, d).transpose(1, 2)
        if getattr(attn, 'norm_q', None) is not None:
            a = attn.norm_q(a)
        a = a.to(compute_dtype)
        if premultiplied:
            out = _agent_core(q, k, v, a, scale, k_shortcut, fused, workspace)
        else:
            out = agentsd_attention(q, k, v, a, scale, k_scale2, k_shortcut, fused=fused)
    else:
        out = _softmax_attention(q, k, v, scale, fused)
    out = out.transpose(1, 2).reshape(B, x.shape[1], -1).to(dtype)
    out = attn.to_out[1](_project_out(attn.to_out[0], out, workspace))
    out = token_merge.unmerge(out)
    if getattr(attn, 'residual_connection', False):
        out = out + hidden_states
    rescale = getattr(attn, 'rescale_output_factor', 1.0)
    if rescale != 1.0:
        out = out / rescale
    return out


# ----------------------------------------------------------------------------------------------------------------------
# patch state, hooks and the processor


class _PatchState:
    """Everything one ``apply_patch`` installed: settings, hooks, original processors, RNG, latent size."""

    def __init__(self, settings: Dict[str, Any], seed: Optional[int]):
        self.settings = dict(settings)
        self.initial = dict(settings)  # what AgentSDSchedule returns to after the last step
        self.seed = seed
        self.generator: Optional[torch.Generator] = None
        self.latent_hw: Optional[Tuple[int, int]] = None
        self.calls = 0
        self.hooks: List[Any] = []
        self.originals: List[Tuple[nn.Module, Any]] = []  # (attn1 module, its processor before the patch)
        self.processors: Dict[str, 'AgentSDAttnProcessor'] = {}
        # scratch tensors of the patched calls, shared: the processors run one after another (~85 MB per image at a
        # 128x128 latent, freed by remove_patch)
        self.workspace = Workspace()

    def merge_generator(self) -> torch.Generator:
        if self.generator is None:
            g = torch.Generator(device='cpu')
            if self.seed is None:
                g.set_state(torch.get_rng_state())  # tomesd / AgentSD: a fork of the global RNG at first use
            else:
                g.manual_seed(self.seed)
            self.generator = g
        return self.generator

    def on_unet_call(self, sample: Optional[torch.Tensor], timestep: Any) -> None:
        if sample is not None and sample.ndim == 4:
            self.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        self.calls += 1
        if self.seed is not None:
            self.merge_generator().manual_seed(_mix_seed(self.seed, timestep, self.calls))


def _mix_seed(seed: int, timestep: Any, calls: int) -> int:
    """A 63-bit seed from (seed, timestep); the UNet call counter stands in when there is no timestep."""
    if isinstance(timestep, torch.Tensor) and timestep.numel() > 0:
        t = float(timestep.reshape(-1)[0])
    elif isinstance(timestep, (int, float)):
        t = float(timestep)
    else:
        t = float(-calls)
    key = int(round(t * 1000.0))
    return (seed * 6364136223846793005 + key * 1442695040888963407 + 1013904223) % (2 ** 63)


class _GridRecord:
    """(h, w) of the last input of one ``Transformer2DModel`` (its blocks' token grid)."""

    def __init__(self):
        self.hw: Optional[Tuple[int, int]] = None


class _BlockContext:
    """Per-block scratch: the merge metric of the running call and the matching shared by attn1 / attn2 / ff."""

    def __init__(self, state: _PatchState, grid: Optional[_GridRecord]):
        self.state = state
        self.grid = grid
        self.metric: Optional[torch.Tensor] = None
        self.token_merge: Optional[TokenMerge] = None
        self.info: Dict[str, Any] = {}
        self.merged_attn2 = False
        self.merged_ff = False

    def reset(self) -> None:
        self.metric = None
        self.token_merge = None
        self.merged_attn2 = False
        self.merged_ff = False

    def compute_merge(self, hidden_states: torch.Tensor) -> Optional[TokenMerge]:
        """The ToMeSD decision + matching for this block call; ``None`` means "leave the attention alone"."""
        s = self.state.settings
        metric, self.metric = self.metric, None
        B, N, _ = hidden_states.shape
        self.info = dict(tokens=N, merged=N, agents=0, hw=None, downsample=None, mode='off')
        if s['ratio'] <= 0 or self.state.latent_hw is None:
            return None
        H, W = self.state.latent_hw
        if H * W < N:
            return None
        ds = downsample_factor(H * W, N)
        self.info['downsample'] = ds
        if ds > s['max_downsample']:
            return None
        hw = self.grid.hw if self.grid is not None else None
        if hw is None or hw[0] * hw[1] != N:
            hw = (int(math.ceil(H / ds)), int(math.ceil(W / ds)))
        if hw[0] * hw[1] != N:
            return None
        if metric is None or metric.shape[:2] != hidden_states.shape[:2]:
            metric = hidden_states  # called outside a block forward: match on the attention input
        r = int(N * s['ratio'])
        agent_r = int(N * s['agent_ratio']) if s['agent_ratio'] else 0
        # odd batches cannot hold (cond, uncond) pairs; random dst would differ between them (ToMeSD rule)
        gen = self.state.merge_generator() if (s['use_rand'] and B % 2 == 0) else None
        tm = bipartite_soft_matching_2d(metric, hw, s['sx'], s['sy'], r, agent_r, generator=gen)
        self.token_merge = tm
        self.info.update(merged=tm.num_merged, agents=tm.num_agents, hw=hw,
                         mode='off' if tm.is_identity else ('agent' if tm.has_agents else 'tome'))
        return tm


class AgentSDAttnProcessor:
    """diffusers attention processor for ``attn1``: AgentSD on merged tokens, else the original processor.

    Attributes:
        original: The processor this one replaced (restored by ``remove_patch``; used for every call AgentSD leaves
            alone: masks, blocks above ``max_downsample``, ``ratio=0``, ...).
        fused_attn: SDPA (True) or the explicit softmax path.
        last_info: Token counts of the last call: ``tokens``, ``merged``, ``agents``, ``hw``, ``downsample`` and
            ``mode`` ('agent', 'tome' or 'off').
    """

    def __init__(self, original: Any, block: _BlockContext):
        self.original = original
        self.fused_attn = True
        self._block = block
        self._cache: Dict[str, Any] = {}  # concatenated q/k/v weight of this attention
        self.last_info: Dict[str, Any] = {}

    def __call__(
            self,
            attn: nn.Module,
            hidden_states: torch.Tensor,
            encoder_hidden_states: Optional[torch.Tensor] = None,
            attention_mask: Optional[torch.Tensor] = None,
            temb: Optional[torch.Tensor] = None,
            *args,
            **kwargs,
    ) -> torch.Tensor:
        tm = None
        if (encoder_hidden_states is None and attention_mask is None and hidden_states.ndim == 3 and not args
                and getattr(attn, 'spatial_norm', None) is None and getattr(attn, 'group_norm', None) is None):
            tm = self._block.compute_merge(hidden_states)
            self.last_info = dict(self._block.info)
        else:
            self._block.metric = None
            self.last_info = dict(tokens=hidden_states.shape[-2], merged=hidden_states.shape[-2], agents=0, hw=None,
                                  downsample=None, mode='off')
        if tm is None or tm.is_identity:
            if args:
                return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
            if temb is not None:  # only when given: custom original processors may not declare it
                kwargs['temb'] = temb
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, **kwargs)
        s = self._block.state.settings
        return agentsd_self_attention(attn, hidden_states, tm, k_scale2=s['k_scale2'], k_shortcut=s['k_shortcut'],
                                      attn_precision=s['attn_precision'], fused=self.fused_attn, cache=self._cache,
                                      workspace=self._block.state.workspace)

    def __repr__(self) -> str:
        return f'AgentSDAttnProcessor(original={type(self.original).__name__}, fused_attn={self.fused_attn})'


def _first_arg(args: tuple, kwargs: dict, name: str) -> Optional[torch.Tensor]:
    if args:
        return args[0]
    return kwargs.get(name)


def _replace_first_arg(args: tuple, kwargs: dict, name: str, value: torch.Tensor):
    if args:
        return (value,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs[name] = value
    return args, kwargs


def _fits(tm: Optional[TokenMerge], x: Any) -> bool:
    return (tm is not None and not tm.is_identity and isinstance(x, torch.Tensor) and x.ndim == 3
            and x.shape[1] == tm.num_tokens and x.shape[0] == tm.batch_size)


def _install_hooks(unet: nn.Module, state: _PatchState, merge_crossattn: bool, merge_mlp: bool) -> List[tuple]:
    """Register the UNet / transformer / block hooks; return (name, block, context) of every patchable block."""

    def unet_pre_hook(module, args, kwargs):
        sample = args[0] if args else kwargs.get('sample')
        timestep = args[1] if len(args) > 1 else kwargs.get('timestep')
        state.on_unet_call(sample, timestep)

    state.hooks.append(unet.register_forward_pre_hook(unet_pre_hook, with_kwargs=True))

    grids: Dict[int, _GridRecord] = {}
    for _, module in unet.named_modules():
        if _isinstance_str(module, 'Transformer2DModel') and hasattr(module, 'transformer_blocks'):
            rec = _GridRecord()

            def grid_hook(mod, args, kwargs, rec=rec):
                x = _first_arg(args, kwargs, 'hidden_states')
                rec.hw = (int(x.shape[-2]), int(x.shape[-1])) if isinstance(x, torch.Tensor) and x.ndim == 4 else None

            state.hooks.append(module.register_forward_pre_hook(grid_hook, with_kwargs=True))
            for block in module.transformer_blocks:
                grids[id(block)] = rec

    blocks = []
    for name, block in unet.named_modules():
        if not _isinstance_str(block, 'BasicTransformerBlock'):
            continue
        attn1 = getattr(block, 'attn1', None)
        if (attn1 is None or getattr(block, 'only_cross_attention', False)
                or getattr(attn1, 'is_cross_attention', False)):
            continue
        ctx = _BlockContext(state, grids.get(id(block)))

        def block_pre_hook(mod, args, kwargs, ctx=ctx):
            ctx.reset()
            ctx.metric = _first_arg(args, kwargs, 'hidden_states')

        def block_post_hook(mod, args, output, ctx=ctx):
            ctx.reset()  # drop the references to this call's tensors

        state.hooks.append(block.register_forward_pre_hook(block_pre_hook, with_kwargs=True))
        state.hooks.append(block.register_forward_hook(block_post_hook))

        for flag, sub_name, attr in ((merge_crossattn, 'attn2', 'merged_attn2'), (merge_mlp, 'ff', 'merged_ff')):
            sub = getattr(block, sub_name, None)
            if not flag or sub is None:
                continue

            def sub_pre_hook(mod, args, kwargs, ctx=ctx, attr=attr):
                x = _first_arg(args, kwargs, 'hidden_states')
                setattr(ctx, attr, _fits(ctx.token_merge, x))
                if getattr(ctx, attr):
                    return _replace_first_arg(args, kwargs, 'hidden_states', ctx.token_merge.merge(x))
                return None

            def sub_post_hook(mod, args, kwargs, output, ctx=ctx, attr=attr):
                if getattr(ctx, attr) and isinstance(output, torch.Tensor):
                    setattr(ctx, attr, False)
                    return ctx.token_merge.unmerge(output)
                return None

            state.hooks.append(sub.register_forward_pre_hook(sub_pre_hook, with_kwargs=True))
            state.hooks.append(sub.register_forward_hook(sub_post_hook, with_kwargs=True))
        blocks.append((name, block, ctx))
    return blocks


# ----------------------------------------------------------------------------------------------------------------------
# public API


def _resolve_unet(pipe_or_unet: Any, caller: str) -> nn.Module:
    """``pipe.unet`` for a pipeline, the module itself for a UNet (any module holding BasicTransformerBlocks)."""
    unet = getattr(pipe_or_unet, 'unet', None)
    if isinstance(unet, nn.Module):
        return unet
    if isinstance(pipe_or_unet, nn.Module):
        if any(_isinstance_str(m, 'BasicTransformerBlock') for m in pipe_or_unet.modules()):
            return pipe_or_unet
        raise TypeError(f'{caller}: {type(pipe_or_unet).__name__} holds no diffusers BasicTransformerBlock; AgentSD '
                        'patches UNet2DConditionModel-style UNets (SD 1.x / 2.x / SDXL)')
    if hasattr(pipe_or_unet, 'components') or _isinstance_str(pipe_or_unet, 'DiffusionPipeline'):
        other = 'a `transformer` (DiT-style) ' if getattr(pipe_or_unet, 'transformer', None) is not None else 'no '
        raise TypeError(f'{caller}: {type(pipe_or_unet).__name__} has {other}denoiser but no `unet`; AgentSD supports '
                        'UNet pipelines (Stable Diffusion 1.x / 2.x / XL)')
    raise TypeError(f'{caller}: expected a diffusers pipeline with a `unet` or a UNet2DConditionModel, '
                    f'got {type(pipe_or_unet).__name__}')


def _validate(s: Dict[str, Any]) -> None:
    if not 0.0 <= float(s['ratio']) < 1.0:
        raise ValueError(f"AgentSD: ratio must be in [0, 1), got {s['ratio']}")
    if s['agent_ratio'] is not None and not 0.0 <= float(s['agent_ratio']) < 1.0:
        raise ValueError(f"AgentSD: agent_ratio must be in [0, 1) or None, got {s['agent_ratio']}")
    for key in ('sx', 'sy', 'max_downsample'):
        if not isinstance(s[key], int) or isinstance(s[key], bool) or s[key] < 1:
            raise ValueError(f'AgentSD: {key} must be a positive int, got {s[key]!r}')
    if s['attn_precision'] not in (None, 'fp32'):
        raise ValueError(f"AgentSD: attn_precision must be None or 'fp32', got {s['attn_precision']!r}")


def _get_state(unet: nn.Module) -> Optional[_PatchState]:
    return unet.__dict__.get(_STATE_ATTR)


def apply_patch(
        pipe_or_unet: Any,
        ratio: float = 0.4,
        agent_ratio: Optional[float] = 0.95,
        sx: int = 4,
        sy: int = 4,
        max_downsample: int = 1,
        k_scale2: float = 0.3,
        k_shortcut: float = 0.075,
        attn_precision: Optional[str] = None,
        use_rand: bool = True,
        merge_crossattn: bool = False,
        merge_mlp: bool = False,
        seed: Optional[int] = None,
) -> Any:
    """Patch a Stable Diffusion pipeline (or its UNet) with AgentSD, in place.

    The defaults are the paper's settings for the first 20 of 50 steps; pass ``callback_on_step_end=AgentSDSchedule()``
    to the pipeline call for the full recommended schedule. Applying to a patched model first removes the old patch
    (the new settings replace the old ones; the saved processors stay the true originals).

    Args:
        pipe_or_unet: A diffusers pipeline with a ``unet`` (SD 1.x / 2.x / XL, img2img, inpaint, ...) or the UNet.
        ratio: Fraction of tokens merged away before self-attention (``r = int(N * ratio)``, capped at the number of
            src tokens, i.e. at 1 - 1 / (sx * sy)). 0 disables the patch (bit-identical outputs).
        agent_ratio: Fraction merged away to form the agent tokens. ``0`` or ``None`` switches agents off: the
            tomesd-equivalent mode (ToMe on self-attention only), for side-by-side comparisons.
        sx: Horizontal stride of the dst grid (one dst per sy x sx cell).
        sy: Vertical stride of the dst grid.
        max_downsample: Patch blocks whose resolution is at most latent / this (1 = full-resolution blocks only;
            SDXL's highest attention resolution is latent / 2, so SDXL needs 2).
        k_scale2: The query -> agent softmax uses ``scale ** k_scale2`` (a temperature).
        k_shortcut: Weight of the ``k_shortcut · V`` term.
        attn_precision: ``'fp32'`` computes the attention in fp32 (recommended for SD 2.x in fp16).
        use_rand: Random dst position inside each cell (forced off for odd batch sizes).
        merge_crossattn: Also merge the cross-attention queries (plain ToMe, same matching).
        merge_mlp: Also merge the feed-forward tokens (plain ToMe, same matching; not recommended).
        seed: Seed of the private RNG for the random dst positions (re-seeded from (seed, timestep) at every UNet call:
            reproducible and independent of the global RNG). ``None`` forks the global RNG like tomesd.

    Returns:
        ``pipe_or_unet``.
    """
    unet = _resolve_unet(pipe_or_unet, 'apply_patch')
    settings = dict(ratio=float(ratio), agent_ratio=None if agent_ratio is None else float(agent_ratio), sx=sx, sy=sy,
                    max_downsample=max_downsample, k_scale2=float(k_scale2), k_shortcut=float(k_shortcut),
                    attn_precision=attn_precision, use_rand=bool(use_rand))
    _validate(settings)
    if seed is not None and not isinstance(seed, int):
        raise ValueError(f'AgentSD: seed must be an int or None, got {seed!r}')
    remove_patch(unet)

    state = _PatchState(settings, seed)
    state.merge_crossattn, state.merge_mlp = bool(merge_crossattn), bool(merge_mlp)
    blocks = _install_hooks(unet, state, merge_crossattn, merge_mlp)
    if not blocks:
        for h in state.hooks:
            h.remove()
        raise TypeError('apply_patch: found no self-attention BasicTransformerBlock to patch in '
                        f'{type(unet).__name__}')
    for name, block, ctx in blocks:
        attn1 = block.attn1
        original = attn1.processor
        proc = AgentSDAttnProcessor(original, ctx)
        state.originals.append((attn1, original))
        state.processors[f'{name}.attn1'] = proc
        if hasattr(attn1, 'set_processor'):
            attn1.set_processor(proc)
        else:
            attn1.processor = proc
    unet.__dict__[_STATE_ATTR] = state
    _warn_if_nothing_patched(unet, max_downsample)
    return pipe_or_unet


def _warn_if_nothing_patched(unet: nn.Module, max_downsample: int) -> None:
    """SDXL-style UNets have no attention at full resolution: tell the user instead of silently doing nothing."""
    down_blocks = getattr(unet, 'down_blocks', None)
    if down_blocks is None:
        return
    levels = [i for i, b in enumerate(down_blocks) if any(_isinstance_str(m, 'BasicTransformerBlock')
                                                          for m in b.modules())]
    if levels and 2 ** min(levels) > max_downsample:
        _logger.warning('AgentSD: the highest-resolution attention of this UNet is at downsample %d > '
                        'max_downsample=%d, so no block will be patched; pass max_downsample=%d (e.g. SDXL)',
                        2 ** min(levels), max_downsample, 2 ** min(levels))


def remove_patch(pipe_or_unet: Any) -> Any:
    """Undo :func:`apply_patch`: restore every original processor object and remove the hooks.

    A no-op on a model that is not patched. Processors that someone replaced after patching are left as they are.

    Returns:
        ``pipe_or_unet``.
    """
    unet = _resolve_unet(pipe_or_unet, 'remove_patch')
    state = _get_state(unet)
    if state is None:
        return pipe_or_unet
    for h in state.hooks:
        h.remove()
    state.hooks.clear()
    for attn1, original in state.originals:
        proc = getattr(attn1, 'processor', None)
        if isinstance(proc, AgentSDAttnProcessor) and proc._block.state is state:
            if hasattr(attn1, 'set_processor'):
                attn1.set_processor(original)
            else:
                attn1.processor = original
    state.originals.clear()
    state.workspace.clear()
    del unet.__dict__[_STATE_ATTR]
    return pipe_or_unet


def is_patched(pipe_or_unet: Any) -> bool:
    """Whether :func:`apply_patch` is active on the pipeline / UNet."""
    return _get_state(_resolve_unet(pipe_or_unet, 'is_patched')) is not None


def update_patch(pipe_or_unet: Any, **settings: Any) -> Dict[str, Any]:
    """Change the settings of an active patch between calls (no re-patching; used by :class:`AgentSDSchedule`).

    Args:
        **settings: Any of ``ratio, agent_ratio, sx, sy, max_downsample, k_scale2, k_shortcut, attn_precision,
            use_rand``.

    Returns:
        The settings now in effect.
    """
    state = _get_state(_resolve_unet(pipe_or_unet, 'update_patch'))
    if state is None:
        raise RuntimeError('update_patch: the model is not patched; call vitzoo.diffusers.apply_patch first')
    unknown = set(settings) - set(_RUNTIME_KEYS)
    if unknown:
        raise ValueError(f'update_patch: unknown or non-runtime settings {sorted(unknown)}; allowed: {_RUNTIME_KEYS}')
    new = dict(state.settings)
    new.update(settings)
    for key in ('ratio', 'k_scale2', 'k_shortcut'):
        new[key] = float(new[key])
    _validate(new)
    state.settings = new
    return dict(new)


def patch_info(pipe_or_unet: Any) -> Dict[str, Dict[str, Any]]:
    """Per patched ``attn1`` (by module name): token counts of its last call (see ``AgentSDAttnProcessor.last_info``).

    Returns an empty dict when the model is not patched.
    """
    state = _get_state(_resolve_unet(pipe_or_unet, 'patch_info'))
    if state is None:
        return {}
    return {name: dict(p.last_info) for name, p in state.processors.items()}


class AgentSDSchedule(_CallbackBase):
    """The official recommended schedule as a ``callback_on_step_end``: one argument to the pipeline call.

    Steps ``< switch_step`` use ``early`` (default: the settings given to :func:`apply_patch`, whose defaults are the
    paper's sx = sy = 4, ratio 0.4, agent_ratio 0.95); later steps use ``late`` (sx = sy = 2, ratio 0.4, agent_ratio
    0.5). After the last step the early settings are restored for the next call. Example::

        apply_patch(pipe)
        images = pipe(prompt, num_inference_steps=50, callback_on_step_end=AgentSDSchedule()).images

    Args:
        switch_step: First step of the late settings: an int (20, the official value for 50 steps) or a float in
            (0, 1), a fraction of the pipeline's number of steps.
        early: Settings for the first steps (``None``: those of ``apply_patch``).
        late: Settings from ``switch_step`` on.
    """

    tensor_inputs: List[str] = []

    def __init__(
            self,
            switch_step: Union[int, float] = 20,
            early: Optional[Dict[str, Any]] = None,
            late: Optional[Dict[str, Any]] = None,
    ):
        if _CallbackBase is not object:
            super().__init__()
        if isinstance(switch_step, float) and not 0.0 < switch_step < 1.0:
            raise ValueError(f'AgentSDSchedule: a float switch_step must be in (0, 1), got {switch_step}')
        if isinstance(switch_step, int) and switch_step < 0:
            raise ValueError(f'AgentSDSchedule: switch_step must be >= 0, got {switch_step}')
        for name, d in (('early', early), ('late', late)):
            bad = set(d or {}) - set(_RUNTIME_KEYS)
            if bad:
                raise ValueError(f'AgentSDSchedule: unknown {name} settings {sorted(bad)}; allowed: {_RUNTIME_KEYS}')
        self.switch_step = switch_step
        self.early = None if early is None else dict(early)
        self.late = dict(RECOMMENDED_LATE if late is None else late)

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: Dict[str, Any]):
        unet = _resolve_unet(pipeline, 'AgentSDSchedule')
        state = _get_state(unet)
        if state is None:
            raise RuntimeError('AgentSDSchedule: the pipeline is not patched; call vitzoo.diffusers.apply_patch first')
        try:
            num_steps = int(pipeline.num_timesteps)
        except (AttributeError, TypeError):
            num_steps = None
        switch = self.switch_step
        if isinstance(switch, float):
            if num_steps is None:
                raise RuntimeError('AgentSDSchedule: a fractional switch_step needs pipeline.num_timesteps')
            switch = int(round(switch * num_steps))
        nxt = step_index + 1
        early = state.initial if self.early is None else {**state.initial, **self.early}
        if num_steps is not None and nxt >= num_steps:
            target = early  # generation finished: the next call starts with the early settings again
        else:
            target = early if nxt < switch else {**early, **self.late}
        update_patch(unet, **{k: target[k] for k in _RUNTIME_KEYS if k in target})
        return callback_kwargs

    def __call__(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: Dict[str, Any]):
        return self.callback_fn(pipeline, step_index, timestep, callback_kwargs)

    def __repr__(self) -> str:
        return f'AgentSDSchedule(switch_step={self.switch_step}, early={self.early}, late={self.late})'
