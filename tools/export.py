#!/usr/bin/env python3
"""Export vitzoo models with ``torch.export`` or to ONNX, validate them against eager, and check ``torch.compile``.

One model::

    python tools/export.py agent_deit_small --pretrained --format onnx --dynamic --output agent_deit_small.onnx
    python tools/export.py agent_pvt_tiny --checkpoint agent_pvt_t.pth --format torch-export --output pvt.pt2
    python tools/export.py sat_deit_tiny --format onnx --model-kwargs depth=2 --json result.json

Every export is reloaded (``torch.export.load`` / an onnxruntime session) and run on a random batch next to the eager
model: the table reports max |diff|, eager vs exported latency (median of ``--repeats``) and the file size. With
``--dynamic`` the height and width are symbolic too (the batch always is, as in timm's ``onnx_export.py``), and the
export is also checked at a second batch size and resolution.

Every registered model (``--check-all``, optionally ``--models PATTERN ...``)::

    python tools/export.py --check-all --checks export compile --compile-backend inductor --json check.json

checks ``torch.export`` (dynamic batch, plus dynamic height/width where the family supports it) and ``torch.compile``
(eval parity; ``--train`` adds one training step whose gradients are compared with eager), ``fullgraph=True`` where the
family promises no graph breaks.

What each family supports (``FAMILIES``): every family exports with ``torch.export`` and to ONNX (opset >= 18 native;
``--opset 17`` is converted down when onnx can) and compiles with ``fullgraph=True``. Agent-Swin and Agent-CSwin
export with a fixed height/width only: their (shifted) window padding and masks are chosen per stage by Python
branches on the map size, which an exported graph cannot keep; ``torch.compile(dynamic=True)`` handles them by
recompiling once per window geometry.

ONNX goes through the ``torch.export``-based exporter (``dynamo=True``, the default of torch >= 2.9; needs
``onnxscript``) with the models' explicit attention path: the exporter's decomposition of the fused CPU attention
fails on its output strides, and ONNX below opset 23 has no fused attention operator, so the graph is the same
matmul / softmax either way. The TorchScript exporter (``dynamo=False``) cannot trace the symbolic-size helpers the
models use and is deprecated.
"""
import argparse
import contextlib
import fnmatch
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from timm.utils import ParseKwargs

try:
    import vitzoo  # noqa: F401  (registers the models)
except ModuleNotFoundError as e:  # the tools use the installed package
    raise SystemExit('vitzoo is not installed: `pip install -e .` in the vitzoo checkout') if e.name == 'vitzoo' else e
from vitzoo.utils import create_model_with_weights, explicit_attention, list_models, time_fn

FORMATS = ('onnx', 'torch-export')


class ExportError(ValueError):
    """An unsupported combination of model and export options (the message says which and why)."""


@dataclass(frozen=True)
class Family:
    """What a model family supports, and a tiny configuration of it for fast checks (same code path)."""
    name: str
    patterns: Tuple[str, ...]
    tiny_model: str
    tiny_kwargs: Dict[str, Any] = field(default_factory=dict)
    fullgraph: bool = True
    dynamic_hw: bool = True
    why_not_dynamic: str = ''


_WINDOWS = ('its {} padding and masks are chosen per stage by Python branches on the map size, which an exported '
            'graph cannot keep')
FAMILIES: Tuple[Family, ...] = (
    Family('agent_deit', ('agent_deit_*',), 'agent_deit_tiny', dict(embed_dim=64, depth=2, num_heads=2)),
    Family('agent_pvt', ('agent_pvt_*',), 'agent_pvt_tiny',
           dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 1, 1))),
    Family('agent_swin', ('agent_swin_*',), 'agent_swin_tiny',
           dict(embed_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4)),
           dynamic_hw=False, why_not_dynamic=_WINDOWS.format('shifted-window')),
    Family('agent_cswin', ('agent_cswin_*',), 'agent_cswin_tiny',
           dict(embed_dim=16, depth=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)),
           dynamic_hw=False, why_not_dynamic=_WINDOWS.format('cross-shaped window')),
    Family('sparsifiner_deit', ('sparsifiner_deit_*',), 'sparsifiner_deit_tiny',
           dict(embed_dim=64, depth=2, num_heads=2)),
    Family('sat_deit', ('sat_deit_*',), 'sat_deit_tiny', dict(embed_dim=48, depth=3, num_heads=3)),
    Family('fan', ('tap_fan_*', 'fan_*'), 'tap_fan_tiny_8_p4_hybrid',
           dict(embed_dim=32, depth=2, num_heads=2, backbone_depths=(1, 1), backbone_dims=(16, 32, 64, 128))),
    # the '_plus' variant: its att_mask (block 0) is the superset of the RVT code paths
    Family('rvt', ('tap_rvt_*', 'rvt_*'), 'tap_rvt_base_plus',
           dict(base_dims=[16], depth=[2], heads=[2], masked_block=1)),
)
# Height / width of a dynamic export are multiples of this (the largest total stride of the dynamic families).
SIZE_MULTIPLE = 32


def family_of(model_name: str) -> Family:
    """The :class:`Family` of a registered vitzoo model name (ExportError for any other name)."""
    for fam in FAMILIES:
        if any(fnmatch.fnmatch(model_name, p) for p in fam.patterns):
            return fam
    raise ExportError(f'{model_name!r} is not a vitzoo model (families: {", ".join(f.name for f in FAMILIES)})')


# ----------------------------------------------------------------------------------------------------------------------
# building and running


def build_model(
        name: str,
        pretrained: bool = False,
        checkpoint: str = '',
        model_kwargs: Optional[Dict[str, Any]] = None,
) -> nn.Module:
    """An eval-mode model; ``checkpoint`` (official or timm layout) loads through the family's checkpoint filter."""
    family_of(name)
    if checkpoint and not os.path.isfile(checkpoint):
        raise ExportError(f'--checkpoint {checkpoint!r} does not exist')
    return create_model_with_weights(name, checkpoint, pretrained, model_kwargs=model_kwargs).eval()


def default_img_size(model: nn.Module) -> int:
    return int(model.pretrained_cfg.get('input_size', (3, 224, 224))[-1])


def dynamic_shapes(fam: Family, dynamic: bool) -> Dict[str, Dict[int, Any]]:
    """``torch.export`` dynamic_shapes for the input ``x``: batch always, height/width with ``dynamic``."""
    from torch.export import Dim
    dims: Dict[int, Any] = {0: Dim('batch', min=1, max=1024)}
    if dynamic:
        if not fam.dynamic_hw:
            raise ExportError(f'--dynamic (any height/width) is not supported for {fam.name}: {fam.why_not_dynamic}. '
                              f'Export at a fixed --img-size instead (the batch size stays dynamic).')
        dims[2] = SIZE_MULTIPLE * Dim('h', min=1, max=64)
        dims[3] = SIZE_MULTIPLE * Dim('w', min=1, max=64)
    return {'x': dims}


def check_inputs(img_size: int, batch_size: int, dynamic: bool, seed: int = 0) -> List[torch.Tensor]:
    """The export example, then (with ``dynamic``) a batch of another size and a non-square resolution."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch_size, 3, img_size, img_size, generator=g)]
    if dynamic:
        h = max(SIZE_MULTIPLE, img_size - 2 * SIZE_MULTIPLE)
        xs.append(torch.randn(batch_size + 1, 3, h, img_size + SIZE_MULTIPLE, generator=g))
    else:
        xs.append(torch.randn(batch_size + 1, 3, img_size, img_size, generator=g))
    return xs


def _onnx_session(path: str):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError('--format onnx needs onnx, onnxscript and onnxruntime: pip install "vitzoo[export]"') from e
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])


def export_torch(model: nn.Module, x: torch.Tensor, fam: Family, dynamic: bool, path: str) -> Callable:
    """``torch.export.export`` (+ save and reload); returns the reloaded program's callable module."""
    with torch.no_grad():
        ep = torch.export.export(model, (x,), dynamic_shapes=dynamic_shapes(fam, dynamic))
    torch.export.save(ep, path)
    return torch.export.load(path).module()


def export_onnx(model: nn.Module, x: torch.Tensor, fam: Family, dynamic: bool, path: str, opset: int) -> Callable:
    """ONNX through the torch.export-based exporter; returns a callable running the file in onnxruntime."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError as e:
        raise ExportError('--format onnx needs onnx, onnxscript and onnxruntime: pip install "vitzoo[export]"') from e
    if opset < 17:
        raise ExportError(f'--opset {opset}: vitzoo exports need opset >= 17 (LayerNormalization)')
    ds = dynamic_shapes(fam, dynamic)
    with explicit_attention(model), torch.no_grad(), _quiet():
        torch.onnx.export(model, (x,), path, dynamo=True, opset_version=opset, input_names=['x'],
                          output_names=['logits'], dynamic_shapes=ds, external_data=False, verbose=False)
    imports = onnx.load(path, load_external_data=False).opset_import
    got = max((o.version for o in imports if o.domain in ('', 'ai.onnx')), default=-1)
    if got != opset:
        raise ExportError(f'--opset {opset}: the exporter produced opset {got} (its conversion down from opset 18 '
                          f'failed, e.g. no antialiased Resize before 18); use --opset 18 or newer')
    sess = _onnx_session(path)
    return lambda t: torch.from_numpy(sess.run(None, {'x': t.numpy()})[0])


@contextlib.contextmanager
def _quiet():
    # the ONNX exporter prints progress lines to stdout; keep the tool's table readable
    with open(os.devnull, 'w') as null, contextlib.redirect_stdout(null):
        yield


def _first_tensor(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def export_and_validate(
        model: nn.Module,
        name: str,
        fmt: str,
        output: str,
        dynamic: bool = False,
        img_size: Optional[int] = None,
        batch_size: int = 2,
        opset: int = 18,
        repeats: int = 5,
) -> Dict[str, Any]:
    """Export ``model``, reload it, and compare it with eager on random inputs; a result row for the table."""
    if fmt not in FORMATS:
        raise ExportError(f'--format {fmt!r} is not supported: choose one of {", ".join(FORMATS)}')
    if batch_size < 2:
        raise ExportError('-b/--batch-size must be >= 2: torch.export specialises a size-1 example batch')
    fam = family_of(name)
    img_size = img_size or default_img_size(model)
    if dynamic and img_size % SIZE_MULTIPLE:
        raise ExportError(f'--dynamic needs an --img-size that is a multiple of {SIZE_MULTIPLE}, got {img_size}')
    model.eval()
    xs = check_inputs(img_size, batch_size, dynamic)
    t0 = time.perf_counter()
    if fmt == 'torch-export':
        run = export_torch(model, xs[0], fam, dynamic, output)
    else:
        run = export_onnx(model, xs[0], fam, dynamic, output, opset)
    export_s = time.perf_counter() - t0
    diffs = []
    with torch.no_grad():
        for x in xs:
            ref = _first_tensor(model(x))
            got = _first_tensor(run(x))
            if got.shape != ref.shape:
                raise RuntimeError(f'{name}: exported output shape {tuple(got.shape)} != eager {tuple(ref.shape)}')
            diffs.append((got - ref).abs().max().item())
        eager_ms = time_fn(lambda: model(xs[0]), repeats) * 1e3
        exported_ms = time_fn(lambda: run(xs[0]), repeats) * 1e3
    return dict(model=name, format=fmt, dynamic=dynamic, input=list(xs[0].shape), checked=[list(x.shape) for x in xs],
                max_abs_diff=max(diffs), max_abs_diff_per_input=diffs, eager_ms=eager_ms, exported_ms=exported_ms,
                export_s=export_s, file=output, file_mb=os.path.getsize(output) / 2 ** 20,
                opset=opset if fmt == 'onnx' else None)


# ----------------------------------------------------------------------------------------------------------------------
# torch.compile


def _tensors(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def train_loss(out: Any) -> torch.Tensor:
    """A scalar that depends on every floating output of a train-mode forward (logits, side outputs)."""
    return sum(t.float().square().mean() for t in _tensors(out))


def check_compile(
        model: nn.Module,
        x: torch.Tensor,
        fullgraph: bool = True,
        backend: str = 'inductor',
        dynamic: Optional[bool] = None,
        train: bool = False,
) -> Dict[str, Any]:
    """Compile ``model`` and compare with eager: eval outputs, and with ``train`` one step's loss and gradients.

    Returns max |diff| of the eval output, the train loss difference and the largest gradient difference relative to
    that parameter's largest eager gradient (``grad_rel_diff``), plus compile and run times.
    """
    torch._dynamo.reset()
    res: Dict[str, Any] = dict(backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    model.eval()
    compiled = torch.compile(model, backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    with torch.no_grad():
        ref = _tensors(model(x))
        t = time.perf_counter()
        got = _tensors(compiled(x))
        res['compile_eval_s'] = time.perf_counter() - t
    if len(got) != len(ref) or any(a.shape != b.shape for a, b in zip(got, ref)):
        raise RuntimeError('compiled and eager models return different outputs')
    res['eval_max_abs_diff'] = max((a - b).abs().max().item() for a, b in zip(got, ref))
    if train:
        model.train()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        model.zero_grad(set_to_none=True)
        loss_ref = train_loss(model(x))
        loss_ref.backward()
        g_ref = [p.grad.clone() if p.grad is not None else None for p in params]
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        loss = train_loss(compiled(x))
        loss.backward()
        res['compile_train_s'] = time.perf_counter() - t
        rel, worst = 0.0, ''
        for (name, p), g in zip(named, g_ref):
            if g is None or p.grad is None:
                if (g is None) != (p.grad is None):
                    raise RuntimeError('compiled and eager training steps reach different parameters')
                continue
            r = ((p.grad - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
            rel, worst = (r, name) if r > rel else (rel, worst)
        model.zero_grad(set_to_none=True)
        model.eval()
        res.update(loss=loss_ref.item(), loss_abs_diff=abs(loss.item() - loss_ref.item()), grad_rel_diff=rel,
                   grad_rel_diff_param=worst, loss_finite=math.isfinite(loss.item()))
    torch._dynamo.reset()
    return res


# ----------------------------------------------------------------------------------------------------------------------
# command line


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f'{v:.2e}' if (v != 0 and abs(v) < 1e-2) else f'{v:.2f}'
    return str(v)


def print_table(rows: Sequence[Dict[str, Any]], cols: Sequence[str]) -> None:
    cells = [[_fmt(r.get(c, '')) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print('| ' + ' | '.join(c.ljust(w) for c, w in zip(cols, widths)) + ' |')
    print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    for row in cells:
        print('| ' + ' | '.join(v.ljust(w) for v, w in zip(row, widths)) + ' |')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('model', nargs='?', help='a vitzoo model name')
    p.add_argument('--checkpoint', default='', help='weights to load (official or timm layout)')
    p.add_argument('--pretrained', action='store_true', help="load the model's pretrained weights")
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='extra model args, key=value')
    p.add_argument('--format', default='onnx', help=f'one of {", ".join(FORMATS)}')
    p.add_argument('--dynamic', action='store_true', help='symbolic height/width (the batch is always dynamic)')
    p.add_argument('--img-size', type=int, default=None, help='example (and, static, the only) input size')
    p.add_argument('-b', '--batch-size', type=int, default=2, help='example batch size (>= 2)')
    p.add_argument('--output', default='', help='output file (default: <model>.onnx / <model>.pt2)')
    p.add_argument('--opset', type=int, default=18, help='ONNX opset (18+ native; 17 converted down when possible)')
    p.add_argument('--repeats', type=int, default=5, help='timed runs per latency median')
    p.add_argument('--json', default='', help='also write the results here')
    p.add_argument('--threads', type=int, default=None, help='torch (and onnxruntime) threads')
    g = p.add_argument_group('checking every registered model')
    g.add_argument('--check-all', action='store_true', help='check every model matching --models')
    g.add_argument('--models', nargs='*', default=['*'], help='fnmatch patterns for --check-all')
    g.add_argument('--checks', nargs='+', default=['export', 'compile'], choices=['export', 'onnx', 'compile'])
    g.add_argument('--compile-backend', default='inductor', help="torch.compile backend ('inductor', 'aot_eager')")
    g.add_argument('--train', action='store_true', help='--check-all compile: also one training step')
    g.add_argument('--tiny', action='store_true', help="--check-all: each family's tiny configuration only")
    return p


def check_all(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Every registered model (or each family's tiny configuration): the selected checks, one row per model."""
    if args.tiny:
        targets = [(f.tiny_model, dict(f.tiny_kwargs, num_classes=10)) for f in FAMILIES]
    else:
        targets = [(n, {}) for n in list_models(args.models)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kwargs in targets:
            fam = family_of(name)
            row: Dict[str, Any] = dict(model=name, family=fam.name, fullgraph=fam.fullgraph, dynamic_hw=fam.dynamic_hw)
            t = time.perf_counter()
            try:
                torch.manual_seed(0)
                model = build_model(name, model_kwargs=kwargs)
                size = default_img_size(model)
                if 'export' in args.checks:
                    r = export_and_validate(model, name, 'torch-export', os.path.join(tmp, 'm.pt2'),
                                            dynamic=fam.dynamic_hw and size % SIZE_MULTIPLE == 0, repeats=1)
                    row.update(export_diff=r['max_abs_diff'], export_dynamic=r['dynamic'])
                if 'onnx' in args.checks:
                    r = export_and_validate(model, name, 'onnx', os.path.join(tmp, 'm.onnx'),
                                            dynamic=fam.dynamic_hw and size % SIZE_MULTIPLE == 0, repeats=1)
                    row.update(onnx_diff=r['max_abs_diff'], onnx_dynamic=r['dynamic'])
                if 'compile' in args.checks:
                    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
                    r = check_compile(model, x, fullgraph=fam.fullgraph, backend=args.compile_backend,
                                      train=args.train)
                    row.update(compile_diff=r['eval_max_abs_diff'], grad_rel_diff=r.get('grad_rel_diff'))
                row['ok'] = True
            except Exception as e:  # one failing model must not hide the others' results
                row.update(ok=False, error=f'{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}')
            row['seconds'] = time.perf_counter() - t
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.check_all:
            rows = check_all(args)
            cols = ['model', 'ok', 'export_diff', 'onnx_diff', 'compile_diff', 'grad_rel_diff', 'seconds', 'error']
            print_table(rows, [c for c in cols if any(c in r for r in rows)])
            status = 0 if all(r['ok'] for r in rows) else 1
        else:
            if not args.model:
                raise ExportError('give a MODEL name, or --check-all')
            if args.format not in FORMATS:
                raise ExportError(f'--format {args.format!r} is not supported: choose one of {", ".join(FORMATS)}')
            if args.pretrained and args.checkpoint:
                raise ExportError('give --pretrained or --checkpoint, not both')
            fam = family_of(args.model)
            if args.dynamic:
                dynamic_shapes(fam, True)  # fail before building the model
            output = args.output or f'{args.model}.{"onnx" if args.format == "onnx" else "pt2"}'
            model = build_model(args.model, args.pretrained, args.checkpoint, args.model_kwargs)
            row = export_and_validate(model, args.model, args.format, output, dynamic=args.dynamic,
                                      img_size=args.img_size, batch_size=args.batch_size, opset=args.opset,
                                      repeats=args.repeats)
            rows = [row]
            print_table(rows, ['model', 'format', 'dynamic', 'checked', 'max_abs_diff', 'eager_ms', 'exported_ms',
                               'file_mb', 'file'])
            status = 0
    except ExportError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)
    return status


if __name__ == '__main__':
    sys.exit(main())
