"""Checkpoint helpers and small layers shared by the vitzoo model files."""
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp as _TimmMlp
from timm.layers import trunc_normal_
from torch.fx.experimental.symbolic_shapes import statically_known_true

from vitzoo.layers.linear import linear_grads, matmul_bias, matmul_grad_input, use_onednn

__all__ = ['CheckpointError', 'unwrap_state_dict', 'check_state_dict', 'adapt_submodules', 'finish_state_dict',
           'embed_patches', 'sizes_match', 'init_weights_trunc_normal', 'has_forward_hooks', 'Mlp']


def sizes_match(a: Tuple[int, ...], b: Tuple[int, ...]) -> bool:
    """``tuple(a) == tuple(b)`` for sizes; False without a guard when tracing with symbolic sizes.

    Models skip a resize (of a position table or bias) when the token grid equals the trained one. Under
    dynamic-shape ``torch.compile`` / ``torch.export`` that comparison would install a guard specialising the graph
    to the example size; a symbolic size takes the resize instead, which is exact at an equal size.
    """
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: names the key, the checkpoint shape and the expected shape."""


def unwrap_state_dict(checkpoint: Dict, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Return the tensor dict of an official/training checkpoint, without DDP ``module.`` prefixes.

    Accepts a plain state_dict or one nested under ``model`` / ``state_dict`` / ``model_ema`` / ``state_dict_ema``
    (the official Agent-Attention checkpoints use ``{'model': ...}``, CSwin EMA ones add ``state_dict_ema``).

    Args:
        checkpoint: What ``torch.load`` returned.
        use_ema: Prefer the EMA weights when both are present.
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'expected a dict checkpoint, got {type(checkpoint).__name__}')
    order = ('state_dict_ema', 'model_ema', 'model', 'state_dict') if use_ema else \
        ('model', 'state_dict', 'state_dict_ema', 'model_ema')
    for key in order:
        inner = checkpoint.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            checkpoint = inner
            break
    out = {}
    for k, v in checkpoint.items():
        if not isinstance(v, torch.Tensor):
            continue  # optimizer state, epoch counters, configs...
        out[k[len('module.'):] if k.startswith('module.') else k] = v
    return out


def check_state_dict(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        skip_prefixes: Iterable[str] = (),
        allow_missing: Iterable[str] = (),
        model_name: Optional[str] = None,
) -> None:
    """Raise one clear :class:`CheckpointError` when a key is missing, unexpected or mis-shaped.

    Classifier keys are skipped (``skip_prefixes``): timm drops or adapts them itself when ``num_classes`` differs.

    Args:
        state_dict: The remapped checkpoint.
        model: The model it should load into.
        skip_prefixes: Key prefixes not checked.
        allow_missing: Key suffixes that may be absent (non-persistent or derived buffers).
        model_name: Name used in messages (defaults to the class name).
    """
    name = model_name or getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
    skip = tuple(skip_prefixes)
    allow = tuple(allow_missing)
    expected = model.state_dict()
    problems = []
    for k, v in expected.items():
        if skip and k.startswith(skip):
            continue
        if k not in state_dict:
            if not (allow and k.endswith(allow)):
                problems.append(f"missing key '{k}' (expected shape {tuple(v.shape)})")
        elif tuple(state_dict[k].shape) != tuple(v.shape):
            problems.append(
                f"key '{k}' has shape {tuple(state_dict[k].shape)} in the checkpoint, but {name} expects "
                f"{tuple(v.shape)}")
    for k in state_dict:
        if k not in expected and not (skip and k.startswith(skip)):
            problems.append(f"unexpected key '{k}' (shape {tuple(state_dict[k].shape)})")
    if problems:
        more = f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''
        raise CheckpointError(f'checkpoint does not fit {name}: ' + '; '.join(problems[:5]) + more)


def adapt_submodules(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Let every submodule that owns a checkpoint adaptation fit its tensors of ``state_dict`` (in place).

    A layer with an ``adapt_state_dict(state_dict, prefix)`` method (e.g. ``AgentAttention``: row/column biases
    trained at another resolution) adapts the keys under its own name; family filters call this after renaming the
    official keys and before :func:`check_state_dict`.

    Returns:
        ``state_dict``.
    """
    for name, m in model.named_modules():
        adapt = getattr(m, 'adapt_state_dict', None)
        if m is not model and callable(adapt):
            adapt(state_dict, f'{name}.')
    return state_dict


def init_weights_trunc_normal(m: nn.Module) -> None:
    """The official ViT/Swin/PVT init (``model.apply``): Linear trunc_normal(std=.02) and zero bias, LayerNorm 1/0."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def finish_state_dict(out: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Last steps of a checkpoint filter on the renamed ``out``: :func:`adapt_submodules`, then
    :func:`check_state_dict` (classifier keys skipped).

    Returns:
        ``out``.
    """
    adapt_submodules(model, out)
    check_state_dict(out, model, skip_prefixes=('head.',))
    return out


def finish_tap_state_dict(
        out: Dict[str, torch.Tensor],
        model: nn.Module,
        target: Dict[str, torch.Tensor],
        family: str,
) -> Dict[str, torch.Tensor]:
    """Last steps of a TAP-family (FAN / RVT) checkpoint filter, on the already remapped ``out``.

    Checks that TAP weights (``dilation_predictor``) and the model agree (``model.num_scales`` > 0 iff present), fills
    absent BatchNorm ``num_batches_tracked`` counters from ``target`` (the model's state dict), then checks every key
    and shape (classifier keys skipped).

    Args:
        out: Remapped checkpoint (updated in place).
        model: The model it should load into.
        target: ``model.state_dict()``.
        family: Model-name stem for the messages ('fan', 'rvt').

    Returns:
        ``out``.
    """
    has_tap = any('.dilation_predictor.' in k for k in out)
    if has_tap and model.num_scales == 0:
        raise CheckpointError(f'checkpoint has TAP weights (dilation_predictor): build a tap_{family}_* model '
                              f'(num_scales=4), not a plain {family}_* one')
    if not has_tap and model.num_scales > 0:
        raise CheckpointError(f'checkpoint has no TAP weights (dilation_predictor): build a plain {family}_* model, '
                              'or pass num_scales=0')
    for k, v in target.items():
        if k.endswith('num_batches_tracked') and k not in out:
            out[k] = v.clone()
    return finish_state_dict(out, model)


def embed_patches(
        model: nn.Module,
        x: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int]]:
    """Patch-embed images for a ViT-style vitzoo model at any resolution (shared by DeiT-like families).

    Expects ``model.patch_embed`` (timm ``PatchEmbed`` with ``output_fmt='NHWC'``), ``model.pos_embed`` (prefix
    positions first), ``model.patch_size`` and ``model.num_prefix_tokens``.

    Returns:
        ``(tokens (B, h*w, C), pos (1, P + h*w, C) resized to the grid, (h, w))``.
    """
    H, W = x.shape[-2:]
    p = model.patch_size
    if H % p or W % p or H < p or W < p:
        raise ValueError(
            f'{type(model).__name__}: input size {H}x{W} is not a multiple of the patch size {p} (at least one patch)')
    # timm's PatchEmbed.forward without its size asserts (checked above): their messages format the size, which makes
    # torch.compile(dynamic=True) specialise the graph to it
    pe = model.patch_embed
    x = pe.norm(pe.proj(x).permute(0, 2, 3, 1))  # B, h, w, C (timm's NCHW -> NHWC)
    B, h, w, C = x.shape
    pos = model.pos_embed
    gh, gw = model.patch_embed.grid_size
    if not sizes_match((h, w), (gh, gw)):
        # timm's resample_abs_pos_embed (bicubic, antialias) without its size-match early-out, which would
        # specialise a dynamic-shape graph to the example size (bicubic at an equal size is exact anyway)
        P = model.num_prefix_tokens
        grid = pos[:, P:].float().reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode='bicubic', antialias=True).flatten(2).transpose(1, 2)
        pos = torch.cat([pos[:, :P], grid.to(pos.dtype)], dim=1)
    return x.reshape(B, h * w, C), pos, (h, w)


def has_forward_hooks(*modules: nn.Module) -> bool:
    """Whether forward (pre-)hooks are registered on any of ``modules`` or globally: a fused path that skips calling
    those modules must then fall back to calling them."""
    return bool(any(m._forward_hooks or m._forward_pre_hooks for m in modules)
                or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


class _GeluMlpFunction(torch.autograd.Function):
    """``fc2(gelu(fc1(x)))`` whose backward writes its gradients into the buffers of the activations it saved.

    Autograd's own backward allocates two fresh hidden-size tensors per block (dL/da and dL/dh, 4x the tokens'
    channels); on a CPU every fresh tensor that large is page-faulted in (~2.5 µs per 4 KiB page: more than the GELU
    backward itself). Here ``a = gelu(h)`` is dead once fc2's weight gradient is taken, so dL/da goes into its buffer
    (with ``onednn``, only when ``fresh_grad`` is False: a smaller fresh output comes from the recycled heap, and
    oneDNN's GEMM is the faster one), and dL/dh into ``h``'s. With ``onednn`` (fp32, see
    :mod:`vitzoo.layers.linear`) the forward GEMMs and the input gradients run in oneDNN as
    :class:`vitzoo.layers.linear.Linear`'s do; otherwise the kernels and summation order are autograd's (bit-identical
    gradients).
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, approximate, onednn, fresh_grad):
        x2 = x.reshape(-1, x.shape[-1])
        h = matmul_bias(x2, w1, b1, onednn)
        a = F.gelu(h, approximate=approximate)
        out = matmul_bias(a, w2, b2, onednn)
        ctx.save_for_backward(x2, w1, w2, h, a)
        ctx.approximate = approximate
        ctx.onednn = onednn
        ctx.fresh_grad = fresh_grad
        ctx.shape = x.shape
        ctx.consumed = False
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if ctx.consumed:
            raise RuntimeError('vitzoo Mlp: the fused training backward reuses its saved activations as gradient '
                               'buffers and runs once per forward (retain_graph); set Mlp.fused_backward = False')
        ctx.consumed = True
        x2, w1, w2, h, a = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        need = ctx.needs_input_grad
        gw2 = g.t().mm(a) if need[3] else None
        gb2 = g.sum(0) if need[4] else None
        if ctx.onednn and ctx.fresh_grad:
            ga = matmul_grad_input(g, w2)  # oneDNN: ~20% faster than MKL, into a fresh (heap-recycled) tensor
        else:
            ga = torch.mm(g, w2, out=a)  # into a's buffer: a fresh output this large is page-faulted in anew
        gh = torch.ops.aten.gelu_backward.grad_input(ga, h, approximate=ctx.approximate, grad_input=h)
        gx, gw1, gb1 = linear_grads(gh, x2, w1, need[:3], ctx.onednn)
        return None if gx is None else gx.view(ctx.shape), gw1, gb1, gw2, gb2, None, None, None


class Mlp(_TimmMlp):
    """timm's ``Mlp`` (same arguments, parameter names and results) with less memory traffic around the GELU.

    - Inference: the GELU runs in place on ``fc1``'s output. The hidden activation is the largest tensor of a
      transformer block (4x the tokens' channels): keeping one copy of it instead of two lowers the peak memory of a
      high-resolution forward by that much (e.g. 77 MB per Swin-T stage-1 block at 896²) and saves a pass over it.
    - Training (``fused_backward``): the backward reuses the saved activations' buffers for its gradients
      (:class:`_GeluMlpFunction`) instead of allocating two hidden-size tensors, 5-15% faster per MLP on a CPU and a
      lower peak. Its GEMMs follow :mod:`vitzoo.layers.linear` (oneDNN for recorded CPU fp32 calls; with that off the
      gradients are timm's bit for bit); one backward per forward (no ``retain_graph`` second pass, no double
      backward: set ``fused_backward = False`` for those). Under autocast the inputs are cast as autocast would.

    Any other activation, dropout, norm, missing bias, forward hooks on the layers, or a traced/compiled graph:
    exactly timm's forward.
    """

    fused_backward: bool = True
    # With oneDNN, dL/da of a hidden activation at least this large goes into the activation's buffer instead of a
    # fresh tensor: glibc serves allocations below its largest mmap threshold (32 MiB on 64-bit) from the recycled
    # heap, larger ones are mapped, and page-faulted, anew on every call.
    grad_buffer_min_bytes: int = 32 << 20

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.act) is nn.GELU and isinstance(self.norm, nn.Identity):
            if not torch.is_grad_enabled():
                if self.act.approximate == 'none' and not self.training:
                    x = self.fc1(x)
                    torch.ops.aten.gelu_(x)
                    return self.fc2(x)
            elif self._fuse_backward(x):
                return self._fused_train_forward(x)
        return super().forward(x)

    @torch.jit.ignore
    def _fuse_backward(self, x: torch.Tensor) -> bool:
        if not self.fused_backward or torch.compiler.is_compiling() or torch.compiler.is_exporting() \
                or not isinstance(x, torch.Tensor):
            return False  # compiled graphs fuse on their own; fx proxies cannot enter an autograd.Function
        if type(self.fc1) is not nn.Linear or type(self.fc2) is not nn.Linear or self.fc1.bias is None \
                or self.fc2.bias is None or self.training and (self.drop1.p > 0.0 or self.drop2.p > 0.0):
            return False
        # forward hooks on the layers (activation statistics, pruning, ...) must see them called
        return not has_forward_hooks(self, self.fc1, self.act, self.fc2)

    @torch.jit.ignore
    def _fused_train_forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        fc1, fc2 = self.fc1, self.fc2
        with torch.autocast(dev, enabled=False):  # cast as autocast would, outside the function (casts get grads)
            args = (x.to(dtype), fc1.weight.to(dtype), fc1.bias.to(dtype), fc2.weight.to(dtype), fc2.bias.to(dtype))
            hidden_bytes = x.numel() // x.shape[-1] * fc1.out_features * args[0].element_size()
            return _GeluMlpFunction.apply(*args, self.act.approximate, use_onednn(*args),
                                          hidden_bytes < self.grad_buffer_min_bytes)
