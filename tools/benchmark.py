#!/usr/bin/env python3
r"""vitzoo benchmark: params, GFLOPs and speed of vitzoo models, as ratios against baselines measured in the same run.

Suites (``--suite``, several allowed):
  models      params, GMACs and eval throughput of the selected ``--model`` patterns, optionally at several
              ``--img-size`` values (latency vs resolution).
  agent       Agent Attention vs the official implementation and timm's softmax counterparts:
              (a) the attention module alone at Agent-PVT stage-1 shapes (C=64, 9 agents) for 224² and 896²;
              (b) whole models vs the official ones built at the same size, and vs timm deit/swin/pvt_v2;
              (c) peak memory (RSS of a fresh process) of one 896² forward.
              The official code is not part of vitzoo: point ``--official-dir`` at a checkout of
              LeapLabTHU/Agent-Attention (``git clone https://github.com/LeapLabTHU/Agent-Attention``); without it only
              the timm baselines are measured.
  sparsifiner Sparsifiner-DeiT-S latency vs timm deit_small_patch16_224 (sparse attention, the original's masked-dense
              attention emulated, dense and token-sparse modes), analytic FLOPs / MHSA reduction (kept entries only),
              and a per-op profile of one forward of each (where the sparse model's extra time goes).
  train       training step (zero grads, forward, loss, backward; ``--train-opt`` adds an optimizer step) of
              ``--train-models`` in fp32 and bf16 autocast at 224² and a higher resolution: step time vs the official
              model (same weights, loaded through ``checkpoint_filter_fn``; the loss difference is reported) and vs
              the timm counterpart, and the peak RSS of one step, each candidate in a fresh process. Each side runs
              its own training forward and loss (TAP: CE + ADL, SAT: CE + area + normalization, Sparsifiner: its
              phase-2 distillation; the agent models: CE). ``--official-dir`` takes any of the official checkouts
              (Agent-Attention, SAT, Sparsifiner, TAPADL); the official CSwin needs ``einops``, Sparsifiner ``yacs``.
              ``--train-breakdown`` profiles each step and splits it into GEMMs, compute kernels (LayerNorm, GELU,
              softmax, SDPA, convolutions), casts, adds / sums and the rest, with the speed-up ceiling over the
              official step if that rest cost vitzoo nothing.
  compile     ``torch.compile`` (inductor) vs eager for ``--compile-models``: the first call's compile time, then eval
              (no-grad forward) and training-step (fp32, fwd + loss + bwd) medians of interleaved calls, and the
              max |diff| of the compiled logits (the speed-up is per model and machine: measure, do not assume).

Every timing is the median of ``--repeats`` interleaved measurements, so the ratios printed are robust to a noisy
machine. Results are printed as tables and written to ``<output>/benchmark.json`` (and one CSV per table).

Examples:
    python tools/benchmark.py --suite models --model 'agent_*' --img-size 224 448
    python tools/benchmark.py --suite agent --official-dir ~/src/Agent-Attention -b 8
    python tools/benchmark.py --suite train --threads 1 --timer cpu \
        --official-dir ~/src/Agent-Attention ~/src/SAT ~/src/Sparsifiner ~/src/TAPADL
    python tools/benchmark.py --suite compile --compile-models agent_pvt_tiny agent_swin_tiny -b 8
"""
import argparse
import csv
import functools
import importlib
import importlib.abc
import importlib.machinery
import json
import math
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import timm

try:
    import vitzoo  # noqa: F401  (registers the models)
except ModuleNotFoundError as e:  # the tools use the installed package
    raise SystemExit('vitzoo is not installed: `pip install -e .` in the vitzoo checkout') if e.name == 'vitzoo' else e
from vitzoo.layers.linear import set_onednn_training
from vitzoo.utils import count_macs, count_params, interleaved_times, list_models, time_fn, time_interleaved


# ----------------------------------------------------------------------------------------------------------------------
# output


def print_table(title: str, rows: List[Dict], out: Optional[Path] = None) -> None:
    """Print rows as an aligned table (and save them as CSV next to the JSON results)."""
    if not rows:
        return
    cols = list(dict.fromkeys(c for r in rows for c in r))  # union, first-seen order (rows may differ)
    fmt = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print(f'\n## {title}')
    print('  '.join(c.ljust(fmt[c]) for c in cols))
    print('  '.join('-' * fmt[c] for c in cols))
    for r in rows:
        print('  '.join(_fmt(r.get(c)).ljust(fmt[c]) for c in cols))
    if out is not None:
        slug = ''.join(ch if ch.isalnum() else '_' for ch in title.lower()).strip('_')
        with open(out / f'{slug}.csv', 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)


def _fmt(v) -> str:
    if v is None:
        return '-'
    if isinstance(v, float):
        return f'{v:.3g}' if abs(v) < 100 else f'{v:.1f}'
    return str(v)


# ----------------------------------------------------------------------------------------------------------------------
# the official Agent-Attention models (measurement only; never part of vitzoo)


# one checkout per official repository, recognised by a file only it has
OFFICIAL_REPOS = {
    'agent': ('agent_transformer/models/agent_swin.py', 'https://github.com/LeapLabTHU/Agent-Attention'),
    'sat': ('Model/SAT.py', 'https://github.com/wpy1999/SAT'),
    'sparsifiner': ('src/models/sparsifiner.py', 'https://github.com/lim142857/Sparsifiner'),
    'tapadl': ('TAPADL_FAN/models/tap_fan.py', 'https://github.com/guoyongcs/TAPADL'),
}


def official_checkouts(dirs: Optional[Sequence[str]]) -> Dict[str, Path]:
    """``{repository kind: checkout root}`` of the ``--official-dir`` folders (any order, any subset)."""
    found = {}
    for d in dirs or ():
        root = Path(d).expanduser()
        kinds = [k for k, (marker, _) in OFFICIAL_REPOS.items() if (root / marker).is_file()]
        if not kinds and (root / 'agent_swin.py').is_file():  # the Agent-Attention models folder itself
            kinds = ['agent']
        if not kinds:
            raise FileNotFoundError(
                f'--official-dir {d}: not a checkout of an official repository (looked for '
                + ', '.join(f'{m} of {url}' for m, url in OFFICIAL_REPOS.values()) + ')')
        found[kinds[0]] = root
    return found


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds the given top-level names (and so their submodules) in one checkout folder, ahead of everything else."""

    def __init__(self, root: Path, names: Set[str]):
        self.root, self.names = str(root), names

    def find_spec(self, fullname, path=None, target=None):
        if path is None and fullname in self.names:
            return importlib.machinery.PathFinder.find_spec(fullname, [self.root])
        return None


@functools.lru_cache(maxsize=None)
def _import_checkout_module(root: Path, *modules: str, names: Tuple[str, ...] = ()) -> Tuple[types.ModuleType, ...]:
    """Import ``modules`` of an official checkout whose top-level names resolve to ``root``, then forget those names.

    The names are ``names``, or by default every top-level module / folder of ``root`` (a checkout's own root).

    Several checkouts ship top-level ``models`` / ``utils`` packages: each import sees only its own, and afterwards
    none of them shadows another (vitzoo itself stays the installed package: sys.path is not touched). timm's
    ``register_model`` is an identity meanwhile, so the official entrypoints never replace vitzoo's models of the same
    name in timm's registry (their cfgs do not parse under timm 1.x either).
    """
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        import timm.models.registry as registry  # the deprecated module the official code imports register_model from
    names = set(names) or {p.stem for p in root.iterdir() if p.suffix == '.py' or p.is_dir()}
    hidden = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split('.')[0] in names}
    register = registry.register_model
    registry.register_model = lambda fn: fn
    finder = _CheckoutFinder(root, names)
    sys.meta_path.insert(0, finder)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return tuple(importlib.import_module(m) for m in modules)
    except ModuleNotFoundError as e:
        if e.name.split('.')[0] in names:
            raise
        raise ModuleNotFoundError(f'--official-dir {root}: the official code imports {e.name!r}, which is not '
                                  f'installed (pip install it to measure against that code)', name=e.name) from e
    finally:
        sys.meta_path.remove(finder)
        registry.register_model = register
        for k in [k for k in sys.modules if k.split('.')[0] in names]:
            del sys.modules[k]
        sys.modules.update(hidden)


def import_official(official_dir: str) -> types.SimpleNamespace:
    """Import the official agent_{deit,pvt,swin,cswin}.py from a checkout, with the shims they need on timm 1.x."""
    root = Path(official_dir).expanduser()
    models = root / 'agent_transformer' / 'models' if (root / 'agent_transformer').is_dir() else root
    needed = ['agent_deit.py', 'deit.py', 'agent_pvt.py', 'agent_swin.py', 'agent_cswin.py']
    missing = [n for n in needed if not (models / n).is_file()]
    if missing:
        raise FileNotFoundError(f'--official-dir {official_dir}: {models} lacks {", ".join(missing)}')
    names = ('agent_deit', 'agent_pvt', 'agent_swin', 'agent_cswin')
    # only the models package itself: its parent may be any folder (a models folder passed directly)
    mods = _import_checkout_module(models.parent, *(f'{models.name}.{n}' for n in names), names=(models.name,))
    return types.SimpleNamespace(**dict(zip(names, mods)))


def _agent_official(official_dirs: Optional[Sequence[str]]) -> Optional[types.SimpleNamespace]:
    root = official_checkouts(official_dirs).get('agent')
    return None if root is None else import_official(str(root))


def official_builders(off: types.SimpleNamespace) -> Dict[str, Callable[[int], nn.Module]]:
    """Official constructors with the same configuration as the vitzoo variant, built at image size ``s``."""
    return {
        'agent_deit_tiny': lambda s: off.agent_deit.VisionTransformer(
            img_size=s, patch_size=16, embed_dim=192, depth=12, num_heads=3, agent_num=[49] * 4, agent_layer=-1),
        'agent_pvt_tiny': lambda s: off.agent_pvt.agent_pvt_tiny(img_size=s),
        'agent_swin_tiny': lambda s: off.agent_swin.AgentSwinTransformer(
            img_size=s, patch_size=4, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
            window_size=56 * s // 224, drop_path_rate=0.0, agent_num=[9, 16, 49, 49], attn_type='AAAB'),
        'agent_cswin_tiny': lambda s: off.agent_cswin.Agent_CSWin_64_24181_tiny_224(
            img_size=s, agent_num=[9, 16, 49, 49], attn_type='AABB',
            la_split_size='-'.join(str(s // r) for r in (4, 8, 16, 32))),
    }


TIMM_COUNTERPARTS = {
    'agent_deit_tiny': 'deit_tiny_patch16_224',
    'agent_pvt_tiny': 'pvt_v2_b1',
    'agent_swin_tiny': 'swin_tiny_patch4_window7_224',
}


def _timm_baseline(name: str, s: int) -> nn.Module:
    kw = dict(img_size=s) if not name.startswith('pvt_v2') else {}
    return timm.create_model(name, **kw)


# ----------------------------------------------------------------------------------------------------------------------
# suites


def suite_models(args, results: Dict) -> None:
    rows = []
    for name in list_models(args.model):
        model = timm.create_model(name).eval()
        sizes = args.img_size or [model.pretrained_cfg['input_size'][-1]]
        for s in sizes:
            x = torch.randn(args.batch_size, 3, s, s)
            with torch.no_grad():
                t = time_fn(lambda: model(x), repeats=args.repeats)
            rows.append(dict(model=name, res=s, params_m=round(count_params(model) / 1e6, 2),
                             gmacs=round(count_macs(model, (3, s, s)) / 1e9, 2),
                             ms_per_img=round(t / args.batch_size * 1e3, 2),
                             img_per_s=round(args.batch_size / t, 1)))
    results['models'] = rows
    print_table('models', rows, args.out)


def suite_agent(args, results: Dict) -> None:
    from vitzoo.layers.agent_attention import AgentAttention
    off = _agent_official(args.official_dir)

    # (a) the module alone at Agent-PVT stage-1 shapes
    rows = []
    for s, b in ((56, args.batch_size), (224, 2)):
        n = s * s
        ours = AgentAttention(64, 1, 9, window_size=(s, s), qkv_layout='q_kv').eval()
        x = torch.randn(b, n, 64)
        fns = {'ours': lambda: ours(x, (s, s))}
        row = dict(image=f'{s * 4}²', tokens=n, batch=b)
        if off is not None:
            ref = off.agent_pvt.AgentAttention(64, n, num_heads=1, qkv_bias=True, agent_num=9).eval()
            ours.load_state_dict(ref.state_dict(), strict=False)
            fns['official'] = lambda: ref(x, s, s)
        with torch.no_grad():
            t = time_interleaved(fns, repeats=args.repeats)
            if off is not None:
                row['max_abs_diff'] = (ours(x, (s, s)) - ref(x, s, s)).abs().max().item()
        row['ours_ms'] = round(t['ours'] * 1e3, 2)
        if off is not None:
            row['official_ms'] = round(t['official'] * 1e3, 2)
            row['speedup'] = round(t['official'] / t['ours'], 2)
        rows.append(row)
    results['agent_module'] = rows
    print_table('agent attention module (Agent-PVT stage 1: C=64, 9 agents)', rows, args.out)

    # (b) whole models
    rows = []
    builders = official_builders(off) if off is not None else {}
    for name in list_models(args.agent_models):
        for s, b in ((224, args.batch_size), (896, 1)):
            ours = timm.create_model(name, img_size=s).eval()
            x = torch.randn(b, 3, s, s)
            fns = {'ours': lambda: ours(x)}
            if name in builders:
                ref = builders[name](s).eval()
                fns['official'] = lambda: ref(x)
            if name in TIMM_COUNTERPARTS:
                base = _timm_baseline(TIMM_COUNTERPARTS[name], s).eval()
                fns['timm'] = lambda: base(x)
            with torch.no_grad():
                t = time_interleaved(fns, repeats=args.repeats)
            row = dict(model=name, res=s, batch=b, ours_ms=round(t['ours'] / b * 1e3, 1))
            if 'official' in t:
                row['official_ms'] = round(t['official'] / b * 1e3, 1)
                row['speedup_vs_official'] = round(t['official'] / t['ours'], 2)
            if 'timm' in t:
                row['timm_model'] = TIMM_COUNTERPARTS[name]
                row['timm_ms'] = round(t['timm'] / b * 1e3, 1)
                row['speed_vs_timm'] = round(t['timm'] / t['ours'], 2)
            rows.append(row)
            del ours
        # latency growth with the token count N (16x from 224² to 896²): t ~ N^e per image, e <= 1 is linear
        small, large = rows[-2], rows[-1]
        for key in ('ours_ms', 'official_ms'):
            if key in small:
                large[key.replace('_ms', '_n_exp')] = round(math.log(large[key] / small[key]) / math.log(16.0), 2)
    results['agent_models'] = rows
    print_table('whole models, ms per image (speedup = baseline time / ours)', rows, args.out)

    # (c) peak memory of one 896² forward, each in a fresh process
    rows = []
    for name in list_models(args.agent_models):
        row = dict(model=name, res=896, ours_mib=_peak_rss(name, 896, 'ours', args.official_dir))
        if name in builders:
            row['official_mib'] = _peak_rss(name, 896, 'official', args.official_dir)
            row['ratio'] = round(row['ours_mib'] / max(row['official_mib'], 1e-9), 2)
        rows.append(row)
    results['agent_memory'] = rows
    print_table('peak memory (RSS increase of one 896² forward, MiB)', rows, args.out)


def _peak_rss(name: str, size: int, which: str, official_dir: Optional[Sequence[str]]) -> float:
    cmd = [sys.executable, __file__, '--_memory-probe', name, str(size), which]
    if official_dir:
        cmd += ['--official-dir', *official_dir]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ)).stdout
    return round(float(out.strip().splitlines()[-1]), 1)


def _memory_probe(name: str, size: int, which: str, official_dir: Optional[Sequence[str]]) -> None:
    """Child process: build the model, then print the RSS growth (MiB) caused by one forward."""
    if which == 'official':
        model = official_builders(_agent_official(official_dir))[name](size).eval()
    else:
        model = timm.create_model(name, img_size=size).eval()
    x = torch.randn(1, 3, size, size)
    # Reset the kernel's peak-RSS mark (VmHWM) so construction-time peaks do not hide the forward's own peak.
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    base = _proc_status_kib('VmRSS')
    with torch.no_grad():
        model(x)
    print((_proc_status_kib('VmHWM') - base) / 1024)


def _proc_status_kib(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{field} not in /proc/self/status')


def _official_style_predictor(pred, q, k):
    """The official MaskPredictor's eval computation order on a vitzoo ``ConnectivityPredictor`` (224², no pruning):
    per-head linears on copies of q / k, k_down, scaled logits, softmax, top-k coefficients scattered into zeros."""
    npt = pred.num_prefix_tokens
    qc, kc = pred.proj_c_q(q[:, :, npt:]), pred.proj_c_k(k)
    coef = ((qc @ (kc.transpose(-2, -1) @ pred.proj_n)) * pred.scale).softmax(dim=-1)
    val, ind = coef.topk(pred.basis_topk, dim=-1, sorted=False)
    coef = torch.zeros_like(coef).scatter_(-1, ind, val)
    return coef @ torch.nn.functional.threshold(pred.proj_back_n.t().abs(), pred.basis_threshold, 0.)


def _official_style_attention(self, x, grid, token_idx=None, return_attn=False, need_cls_attn=False):
    """The official Sparsifiner attention's cost structure on a vitzoo ``SparseAttention`` (eval, measurement only).

    The original's predictor order, ``torch.topk`` on the float scores, then what the original does with the kept
    indices: a float 0/1 mask scattered into zeros plus a concatenated dense class-token row, the full logits, an
    unmasked softmax (always computed there, for a disabled loss), ``masked_fill(mask == 0, -inf)``, softmax and
    ``nan_to_num``. Outputs equal the vitzoo forward up to fp32 rounding (masks equal barring exact fp32 near-ties).
    """
    B, N, C = x.shape
    npt = self.num_prefix_tokens
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    approx = _official_style_predictor(self.mask_predictor, q, k)
    idx = approx.topk(self.budget(grid, N), dim=-1, sorted=False)[1]
    mask = torch.zeros_like(approx).scatter_(-1, idx, 1.)
    mask = torch.cat([torch.ones_like(mask[:, :, :npt]), mask], dim=2)
    logits = (q @ k.transpose(-2, -1)) * self.scale
    _unmasked = logits.softmax(dim=-1)  # noqa: F841  (the original always computes it)
    attn = logits.masked_fill(mask == 0, float('-inf')).softmax(dim=-1).nan_to_num()
    out = {'approx': approx, 'idx': idx}
    if need_cls_attn:
        out['cls_attn'] = attn[:, :, 0, npt:]
    x = (attn @ v).transpose(1, 2).reshape(B, N, C)
    return self.proj(x), out


def _op_times(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, Dict[str, List[float]]]:
    """``{fn name: {op: [self CPU ms, calls, CPU ms including child ops]}}`` per call of each fn, from torch.profiler
    runs interleaved across ``repeats``."""
    from torch.profiler import ProfilerActivity, profile
    per: Dict[str, Dict[str, List[float]]] = {name: {} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            for e in prof.key_averages():
                acc = per[name].setdefault(e.key, [0., 0., 0.])
                acc[0] += e.self_cpu_time_total / repeats / 1e3
                acc[1] += e.count / repeats
                acc[2] += e.cpu_time_total / repeats / 1e3
    return per


def _op_table(fns: Dict[str, Callable[[], object]], repeats: int, base: str) -> List[Dict]:
    """Per-op self CPU time (ms per call of each fn) from torch.profiler, profiles interleaved across ``repeats``.

    One column per fn plus, for the others, the difference to ``base`` and that difference as a percentage of
    ``base``'s total (so the rows of one fn add up to its latency overhead). Largest first, ops under 0.5% dropped.
    """
    per = _op_times(fns, repeats)
    total = {name: sum(v[0] for v in d.values()) for name, d in per.items()}
    ops = sorted({o for d in per.values() for o in d}, key=lambda o: -max(d.get(o, [0.])[0] for d in per.values()))
    rows = []
    for o in ops + ['TOTAL']:
        vals = {n: (total[n] if o == 'TOTAL' else d.get(o, [0., 0.])[0]) for n, d in per.items()}
        if o != 'TOTAL' and max(abs(v - vals[base]) for v in vals.values()) < 0.005 * total[base] \
                and vals[base] < 0.005 * total[base]:
            continue
        row = dict(op=o)
        for n, v in vals.items():
            row[f'{n}_ms'] = round(v, 1)
            if n != base:
                row[f'{n}_delta_pct_of_{base}'] = round(100 * (v - vals[base]) / total[base], 1)
            if o != 'TOTAL':
                row[f'{n}_calls'] = int(round(per[n].get(o, [0., 0.])[1]))
        rows.append(row)
    return rows


def suite_sparsifiner(args, results: Dict) -> None:
    """Sparsifiner-DeiT-S vs timm DeiT-S: whole models (medians of interleaved per-repeat ratios), then op by op.

    Rows: the dense timm baseline; vitzoo's sparse attention (keep 0.25, the released config); the same weights with
    the original's masked-dense attention emulated; Sparsifiner with ``attn_keep_rate=1`` (dense, i.e. DeiT-S run
    through vitzoo: the framework overhead); the token-sparse mode at the reference rate 0.7 (``TOKEN_SPARSE_KWARGS``)
    and at 0.5. The analytic FLOPs columns follow the paper's accounting (``sparsifiner_flops``).
    """
    import types
    mod = importlib.import_module('vitzoo.models.sparsifiner')
    from vitzoo.layers.sparse_attention import SparseAttention
    bs = args.batch_size
    x = torch.randn(bs, 3, 224, 224)
    torch.manual_seed(0)
    sparse = timm.create_model('sparsifiner_deit_small').eval()
    original = timm.create_model('sparsifiner_deit_small').eval()
    original.load_state_dict(sparse.state_dict())
    for m in original.modules():
        if isinstance(m, SparseAttention):
            m.forward = types.MethodType(_official_style_attention, m)
    tok = getattr(mod, 'TOKEN_SPARSE_KWARGS', dict(token_keep_rate=0.7, token_pruning_loc=(3, 6, 9)))
    cands = {
        'deit_small_patch16_224 (timm, dense)': timm.create_model('deit_small_patch16_224').eval(),
        'sparsifiner_deit_small (vitzoo, keep 0.25)': sparse,
        'sparsifiner_deit_small, original-style attention': original,
        'sparsifiner_deit_small attn_keep_rate=1 (dense)': timm.create_model(
            'sparsifiner_deit_small', attn_keep_rate=1.0).eval(),
        f"token-sparse r={tok['token_keep_rate']} (TOKEN_SPARSE_KWARGS)": timm.create_model(
            'sparsifiner_deit_small', **tok).eval(),
        'token-sparse r=0.5': timm.create_model('sparsifiner_deit_small', **dict(tok, token_keep_rate=0.5)).eval(),
    }
    base = next(iter(cands))
    with torch.no_grad():
        y_sparse, y_orig = sparse(x), original(x)
        times = interleaved_times({k: (lambda m=m: m(x)) for k, m in cands.items()}, repeats=args.repeats)
    rows = []
    for k, m in cands.items():
        ratios = [a / b for a, b in zip(times[k], times[base])]
        row = dict(model=k, ms_per_img=round(statistics.median(times[k]) / bs * 1e3, 2),
                   latency_vs_deit_s=round(statistics.median(ratios), 3))
        if k != base:
            f = mod.sparsifiner_flops(m, (3, 224, 224))
            row.update(gmacs=round(f['total'] / 1e9, 3), mhsa_reduction=round(f['mhsa_reduction'], 3))
        else:
            row.update(gmacs=round(count_macs(m) / 1e9, 3))
        rows.append(row)
    diff = float((y_sparse - y_orig).abs().max())
    reduction = mod.sparsifiner_flops(sparse)['mhsa_reduction']
    results['sparsifiner'] = dict(models=rows, original_style_max_abs_diff=diff,
                                  mhsa_flops_reduction_keep_0_25=reduction)
    print_table('sparsifiner vs dense DeiT-S (CPU, fp32, eval, batch %d, 224, %d threads, median of %d interleaved '
                'ratios)' % (bs, torch.get_num_threads(), args.repeats), rows, args.out)
    print(f'MHSA FLOPs reduction at keep 0.25: {reduction:.1%} (analytic); original-style vs vitzoo logits max |diff| '
          f'{diff:.1e}')

    # op by op: where the sparse model's extra time goes (whole forwards, profiles interleaved)
    with torch.no_grad():
        ops = _op_table({'deit_s': lambda: cands[base](x), 'sparsifiner': lambda: sparse(x)},
                        max(2, args.repeats // 2), base='deit_s')
    results['sparsifiner_ops'] = ops
    print_table('self CPU time per op, one forward (batch %d, 224): timm DeiT-S vs sparsifiner_deit_small' % bs, ops,
                args.out)


# ----------------------------------------------------------------------------------------------------------------------
# training step: forward + loss + backward (+ optimizer step), vs the official code and the timm counterpart

TRAIN_MODELS = ['agent_deit_tiny', 'agent_pvt_tiny', 'agent_swin_tiny', 'agent_cswin_tiny', 'sparsifiner_deit_tiny',
                'sat_deit_tiny', 'tap_fan_tiny_12_p16_224', 'tap_rvt_tiny']
# The method families' timm counterpart is the plain DeiT-T step (no method loss): a smaller computation.
TRAIN_TIMM_COUNTERPARTS = dict(TIMM_COUNTERPARTS, sparsifiner_deit_tiny='deit_tiny_patch16_224',
                               sat_deit_tiny='deit_tiny_patch16_224', tap_fan_tiny_12_p16_224='deit_tiny_patch16_224',
                               tap_rvt_tiny='deit_tiny_patch16_224')
# The official builders scale Swin's WINDOW_SIZE with the image (window blocks: WINDOW_SIZE // 8, so stage 4 is one
# window above 224²); ours gets the same configuration, or the two would not compute the same function there.
TRAIN_OURS_KWARGS = {'agent_swin_tiny': lambda s: dict(window_size=56 * s // 224)}
CLOCKS = {'wall': time.perf_counter, 'cpu': time.process_time}


def official_method_builders(checkouts: Dict[str, Path]) -> Dict[str, Callable[[int], Optional[nn.Module]]]:
    """Official Sparsifiner / SAT / TAP-FAN / TAP-RVT constructors matching the vitzoo training variants.

    A builder returns None at an image size its official code cannot build (SAT and TAP-RVT are fixed at 224²).
    """
    builders = {}
    if 'sat' in checkouts:
        sat, = _import_checkout_module(checkouts['sat'], 'Model.SAT')
        builders['sat_deit_tiny'] = lambda s: sat.deit_sat_tiny_patch16_224() if s == 224 else None
    if 'tapadl' in checkouts:
        fan, = _import_checkout_module(checkouts['tapadl'] / 'TAPADL_FAN', 'models.tap_fan')
        rvt, = _import_checkout_module(checkouts['tapadl'] / 'TAPADL_RVT', 'tap_robust_models')
        # num_scales: their main.py's --num-scales default (4)
        builders['tap_fan_tiny_12_p16_224'] = lambda s: fan.tap_fan_tiny_12_p16_224(img_size=s, num_scales=4)
        builders['tap_rvt_tiny'] = lambda s: (rvt.tap_rvt_tiny(False, pretrained_cfg=None, num_scales=4) if s == 224
                                              else None)
    if 'sparsifiner' in checkouts:
        builders['sparsifiner_deit_tiny'] = lambda s: _official_sparsifiner(checkouts['sparsifiner'], s)
    return builders


def _official_sparsifiner(root: Path, s: int) -> nn.Module:
    """The official Sparsifiner at DeiT-T size, configured as ``src/main.py`` runs its phase-2 ('cls_distill') epochs:
    the default config merged with ``sparsifiner_default_config.yaml``, every parameter trainable, and the loss flags
    of that phase. The model carries ``official_cfg`` and ``official_loss`` (``src/losses.py``'s ``NewLoss`` class)."""
    config, models, losses = _import_checkout_module(root / 'src', 'config.default_config', 'models.sparsifiner',
                                                     'losses')
    cfg = config.get_cfg_defaults()
    cfg.merge_from_file(str(root / 'experiments-results-analysis' / 'experiments' / 'sparsifiner_default_config.yaml'))
    # main.py, strategy 'cls_distill'
    cfg.LOSS.USE_CLS, cfg.LOSS.USE_CLS_DISTILL, cfg.LOSS.USE_TOKEN_DISTILL = True, True, True
    cfg.LOSS.USE_ATTN_SELF_DISTILL, cfg.LOSS.ATTN_SELF_DISTILL.WEIGHT, cfg.LOSS.USE_ATTN_RECON = True, 0.0, False
    depth = 12
    model = models.Sparsifiner(
        img_size=s, patch_size=16, embed_dim=192, depth=depth, num_heads=3, mlp_ratio=4, qkv_bias=True, distill=True,
        attn_keep_rate_list=[cfg.SPAR.ATTN_KEEP_RATE] * depth, token_keep_rate_list=[1.0] * depth,
        token_pruning_loc_indicator=[False] * depth, reduce_n_factor=cfg.SPAR.REDUCE_N_FACTOR,
        reduce_c_factor=cfg.SPAR.REDUCE_C_FACTOR, share_inout_proj=cfg.SPAR.SHARE_INOUT_PROJ, cfg=cfg)
    model.official_cfg = cfg
    model.official_loss = losses.NewLoss
    return model


def _train_candidates(
        name: str,
        s: int,
        official_dir: Optional[Sequence[str]],
        only: Optional[str] = None,
) -> Dict[str, nn.Module]:
    """'ours', 'official' and 'timm' (those that exist, or just ``only``) in train mode, built at image size ``s``.

    With both present, the official model's weights are loaded into ours through the family's
    ``checkpoint_filter_fn``: the two compute the same function.
    """
    torch.manual_seed(0)
    cands = {}
    if only in (None, 'ours'):
        cands['ours'] = timm.create_model(name, img_size=s, **TRAIN_OURS_KWARGS.get(name, lambda _: {})(s))
    builders = {}
    if official_dir and only in (None, 'official'):
        checkouts = official_checkouts(official_dir)
        builders = official_method_builders(checkouts)
        if 'agent' in checkouts:
            builders.update(official_builders(import_official(str(checkouts['agent']))))
    ref = builders[name](s) if name in builders else None
    if ref is not None:
        cands['official'] = ref
        if 'ours' in cands:
            filt = importlib.import_module(type(cands['ours']).__module__).checkpoint_filter_fn
            cands['ours'].load_state_dict(filt(ref.state_dict(), cands['ours']))
    if name in TRAIN_TIMM_COUNTERPARTS and only in (None, 'timm'):
        cands['timm'] = _timm_baseline(TRAIN_TIMM_COUNTERPARTS[name], s)
    if only is not None and only not in cands:
        raise ValueError(f'no {only!r} candidate for {name}')
    return {k: m.train() for k, m in cands.items()}


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _train_loss_fn(name: str, which: str, model: nn.Module, x: torch.Tensor) -> LossFn:
    """Forward + loss of one candidate as its code trains (``loss_fn(model, x, y)``).

    vitzoo: ``vitzoo.train_utils.TrainWrapper``'s method forward and the method loss of ``tools/train.py`` with its
    default weights (TAP: CE + ADL; SAT: CE + area + normalization; Sparsifiner: its phase 2, CE + logit KL + token
    MSE, predictor frozen). Official: the forward and loss of its training script (SAT ``train.py``; TAPADL
    ``main.py`` / ``engine.py`` — their ADL function is the same formula as vitzoo's, which both use; Sparsifiner
    ``engine.py`` with ``NewLoss`` in the 'cls_distill' configuration). timm and the agent models: cross-entropy.
    Sparsifiner's frozen teacher (a DeiT-T) runs once, outside the timed step, and both students read its outputs.
    """
    from vitzoo.train_utils import TrainWrapper, method_of
    method = method_of(name) if which != 'timm' else 'none'
    if method == 'adl':
        from vitzoo.losses.adl import AttentionDiversificationLoss
        adl = AttentionDiversificationLoss(1.0, 2.0)

        def tap_loss(m, x, y):
            logits, attn = m(x, return_attn=True)
            return F.cross_entropy(logits, y) + adl(attn)
        return tap_loss
    if method == 'sat':
        if which == 'official':
            def official_sat_loss(m, x, y):  # train.py: CE + |mean area - thr| + mean norm term, area_thr 0.25
                logits, area, norm = m(x, phase='train')
                return F.cross_entropy(logits, y) + torch.abs(area.mean(0) - 0.25).mean(0) + norm.mean(0)
            return official_sat_loss
        from vitzoo.losses.sat import SATLoss
        crit = SATLoss(area_thr=0.25)
        return lambda m, x, y: crit(m.forward_loc(x), y)
    if method == 'sparsifiner':
        from vitzoo.losses.sparsifiner import distill_loss, teacher_outputs
        torch.manual_seed(0)
        with torch.no_grad():
            t = teacher_outputs(timm.create_model('deit_tiny_patch16_224', img_size=x.shape[-1]).eval(), x,
                                return_attn=False)
        if which == 'official':
            crit = model.official_loss(lambda _: (t['logits'], t['features'], []), nn.CrossEntropyLoss())
            return lambda m, x, y: crit(x, m(x), y, m.official_cfg)[0]
        model.set_training_phase('distill')
        return lambda m, x, y: distill_loss(TrainWrapper(m, 'sparsifiner')(x), t, y)[0]
    return lambda m, x, y: F.cross_entropy(m(x), y)


def _train_step(
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        dtype: str,
        opt: str,
        loss_fn: Optional[LossFn] = None,
) -> Callable[[], torch.Tensor]:
    """One training step on (x, y): zero grads, forward (bf16 autocast or fp32) + loss (``loss_fn``, default
    cross-entropy), backward, and the optimizer step when ``opt`` is 'sgd' / 'adamw' ('none': no step)."""
    loss_fn = loss_fn or (lambda m, x, y: F.cross_entropy(m(x), y))
    optim = None
    params = [p for p in model.parameters() if p.requires_grad]
    if opt == 'sgd':
        optim = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    elif opt == 'adamw':
        optim = torch.optim.AdamW(params, lr=1e-4)

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == 'bf16'):
            loss = loss_fn(model, x, y)
        loss.backward()
        if optim is not None:
            optim.step()
        return loss.detach()
    return step


def suite_train(args, results: Dict) -> None:
    """Training-step time and peak memory of each ``--train-models`` entry vs the official model and timm's counterpart.

    For every resolution in ``--train-img-size`` (``-b`` up to 224², above it shrunk with the token count, at least 1)
    and dtype in ``--train-dtypes``: the median step time of ``--repeats`` interleaved steps, the speed-ups as medians
    of the per-repeat time ratios, the loss difference to the official model (same weights and batch, before any
    step), and the peak RSS of one step measured in a fresh process per candidate.
    """
    clock = CLOCKS[args.timer]
    what = 'fwd + loss + bwd' + ('' if args.train_opt == 'none' else f' + {args.train_opt} step')
    rows, breakdown = [], []
    for name in list_models(args.train_models):
        for s in args.train_img_size:
            b = max(1, round(args.batch_size * min(1.0, 224 * 224 / (s * s))))
            cands = _train_candidates(name, s, args.official_dir)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(b, 3, s, s, generator=g)
            y = torch.randint(0, 1000, (b,), generator=g)
            for dtype in args.train_dtypes:
                row = dict(model=name, res=s, batch=b, dtype=dtype)
                steps = {k: _train_step(m, x, y, dtype, args.train_opt, _train_loss_fn(name, k, m, x))
                         for k, m in cands.items()}
                if 'official' in steps:  # same weights, same batch: the losses agree (checked before any update)
                    row['loss_diff'] = abs(float(steps['ours']()) - float(steps['official']()))
                # the warm-up call also allocates the optimizer state
                times = interleaved_times(steps, repeats=args.repeats, clock=clock)
                row['ours_ms'] = round(statistics.median(times['ours']) * 1e3, 1)
                for k, label in (('official', 'vs_official'), ('timm', 'vs_timm')):
                    if k in times:
                        if k == 'timm':
                            row['timm_model'] = TRAIN_TIMM_COUNTERPARTS[name]
                        row[f'{k}_ms'] = round(statistics.median(times[k]) * 1e3, 1)
                        row[f'speed_{label}'] = round(statistics.median(
                            [a / o for a, o in zip(times[k], times['ours'])]), 3)
                if args.train_breakdown:
                    breakdown += _breakdown_rows(row, steps, repeats=2)
                if args.train_memory:
                    for k in steps:
                        row[f'{k}_mib'] = _train_peak_rss(name, s, k, b, dtype, args)
                    if 'official_mib' in row:
                        row['mem_vs_official'] = round(row['ours_mib'] / max(row['official_mib'], 1e-9), 2)
                rows.append(row)
                print('  ' + ', '.join(f'{k}={_fmt(v)}' for k, v in row.items()), flush=True)  # long runs: progress
            del cands
    results['train'] = rows
    print_table(f'training step ({what}), ms per step, CPU, {torch.get_num_threads()} threads, {args.timer} time, '
                f'median of {args.repeats} interleaved (speed = baseline / ours); peak RSS of one step in MiB', rows,
                args.out)
    if breakdown:
        results['train_breakdown'] = breakdown
        # shares of GEMMs, compute kernels, casts, adds / sums and the rest (see GEMM_OPS)
        print_table('training step breakdown (profiled CPU ms per step, mean of 2, and % per op class; '
                    'ceiling_vs_official = official step / our floor)', breakdown, args.out)


# Op classes of the training-step breakdown (--train-breakdown). GEMMs: every matrix product, including oneDNN's
# linear. Kernels: the other compute kernels, the same aten kernels whatever model code calls them (LayerNorm, GELU,
# softmax, fused attention (SDPA) and the convolutions, forward and backward). Casts: the dtype conversions
# (autocast's casts of weights and activations and of their gradients; timed with the copies they make). Adds / sums:
# element-wise adds (residual connections, biases, gradient accumulation) and sums (bias gradients). Other: the rest
# (layout copies, pooling, fills, allocation, autograd and dispatch overhead).
GEMM_OPS = frozenset({'aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm', 'aten::addbmm',
                      'aten::_addmm_activation', 'mkldnn::_linear_pointwise'})
KERNEL_OPS = frozenset({'aten::native_layer_norm', 'aten::native_layer_norm_backward', 'aten::gelu',
                        'aten::gelu_backward', 'aten::_softmax', 'aten::_softmax_backward_data',
                        'aten::mkldnn_convolution', 'aten::convolution_backward'} | {
    f'aten::_scaled_dot_product_{k}{b}' for k in ('flash_attention', 'efficient_attention', 'cudnn_attention',
                                                  'flash_attention_for_cpu') for b in ('', '_backward')})
CAST_OP = 'aten::_to_copy'
ADD_SUM_OPS = frozenset({'aten::add', 'aten::add_', 'aten::sum'})
BREAKDOWN = ('gemm', 'kernels', 'casts', 'adds_sums', 'other')


def step_breakdown(ops: Dict[str, List[float]]) -> Dict[str, float]:
    """Split one step's profile (``{op: [self ms, calls, ms with child ops]}``) into the ms of each BREAKDOWN class
    (see GEMM_OPS) and their total. A cast is counted with its child copy, the other classes by self time."""
    out = dict.fromkeys(BREAKDOWN, 0.0)
    for op, (ms, _, _) in ops.items():
        out['gemm' if op in GEMM_OPS else 'kernels' if op in KERNEL_OPS else
            'adds_sums' if op in ADD_SUM_OPS else 'other'] += ms
    out['total'] = sum(out.values())
    if CAST_OP in ops:  # move the casts' time, children included (copy_, empty_strided: in 'other'), out of 'other'
        out['casts'] = ops[CAST_OP][2]
        out['other'] -= out['casts']
    return out


def _breakdown_rows(row: Dict, steps: Dict[str, Callable[[], torch.Tensor]], repeats: int) -> List[Dict]:
    """One row per candidate: its profiled step and the share of each BREAKDOWN class. The 'ours' row also gets
    ``floor_ms`` (its GEMMs, kernels, casts, adds and sums) and ``ceiling_vs_official`` (the official profiled step /
    floor_ms): the speed-up vitzoo would reach if everything else in its step (layout copies, pooling, fills,
    allocation, autograd and dispatch overhead) cost nothing."""
    split = {k: step_breakdown(ops) for k, ops in _op_times(steps, repeats).items()}
    rows = []
    for k, b in split.items():
        r = dict(model=row['model'], res=row['res'], dtype=row['dtype'], candidate=k, profiled_ms=round(b['total'], 1))
        for c in BREAKDOWN:
            r[f'{c}_pct'] = round(100 * b[c] / b['total'], 1)
        if k == 'ours' and 'official' in split:
            floor = b['total'] - b['other']
            r['floor_ms'] = round(floor, 1)
            r['ceiling_vs_official'] = round(split['official']['total'] / floor, 3)
        rows.append(r)
    return rows


def _train_peak_rss(name: str, size: int, which: str, batch: int, dtype: str, args) -> float:
    cmd = [sys.executable, __file__, '--_train-probe', name, str(size), which, str(batch), dtype,
           '--train-opt', args.train_opt, '--threads', str(torch.get_num_threads()),
           '--train-linear', args.train_linear]
    if args.official_dir:
        cmd += ['--official-dir', *args.official_dir]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ)).stdout
    return round(float(out.strip().splitlines()[-1]), 1)


def _train_probe(name: str, size: int, which: str, batch: int, dtype: str, args) -> None:
    """Child process: build one candidate, then print the RSS growth (MiB) caused by its first training step."""
    model = _train_candidates(name, size, args.official_dir, only=which)[which]
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    step = _train_step(model, x, y, dtype, args.train_opt, _train_loss_fn(name, which, model, x))
    with open('/proc/self/clear_refs', 'w') as f:  # reset VmHWM: construction peaks must not hide the step's
        f.write('5')
    base = _proc_status_kib('VmRSS')
    step()
    print((_proc_status_kib('VmHWM') - base) / 1024)


def suite_compile(args, results: Dict) -> None:
    """Eval and training-step speed of ``torch.compile(model)`` (inductor, static shapes) vs the eager model.

    Per model at 224² and batch ``-b``: the wall time of the first compiled call (eval and train compile separately),
    the median eval / train-step times of ``--repeats`` interleaved calls, the speed-ups as medians of the per-round
    ratios (eager / compiled) and the max |diff| of the compiled eval logits to eager.
    """
    clock = CLOCKS[args.timer]
    rows = []
    for name in list_models(args.compile_models):
        torch.manual_seed(0)
        model = timm.create_model(name)
        compiled = torch.compile(model, backend=args.compile_backend)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch_size, 3, 224, 224, generator=g)
        y = torch.randint(0, model.num_classes, (args.batch_size,), generator=g)
        row = dict(model=name, batch=args.batch_size, backend=args.compile_backend)
        model.eval()
        with torch.no_grad():
            t0 = time.perf_counter()
            out = compiled(x)
            row['compile_eval_s'] = round(time.perf_counter() - t0, 1)
            row['max_abs_diff'] = float((out - model(x)).abs().max())

            def infer(m):
                return lambda: m(x)
            times = interleaved_times({'eager': infer(model), 'compiled': infer(compiled)}, args.repeats, clock=clock)
        row['eval_ms'] = round(statistics.median(times['eager']) * 1e3, 1)
        row['eval_compiled_ms'] = round(statistics.median(times['compiled']) * 1e3, 1)
        row['eval_speedup'] = round(statistics.median([e / c for e, c in zip(times['eager'], times['compiled'])]), 3)
        model.train()
        steps = {k: _train_step(m, x, y, 'fp32', 'none') for k, m in (('eager', model), ('compiled', compiled))}
        t0 = time.perf_counter()
        steps['compiled']()
        row['compile_train_s'] = round(time.perf_counter() - t0, 1)
        times = interleaved_times(steps, args.repeats, clock=clock)
        row['train_ms'] = round(statistics.median(times['eager']) * 1e3, 1)
        row['train_compiled_ms'] = round(statistics.median(times['compiled']) * 1e3, 1)
        row['train_speedup'] = round(statistics.median([e / c for e, c in zip(times['eager'], times['compiled'])]), 3)
        rows.append(row)
        print('  ' + ', '.join(f'{k}={_fmt(v)}' for k, v in row.items()), flush=True)  # compiling takes minutes
        del model, compiled
        torch._dynamo.reset()
    results['compile'] = rows
    print_table(f'torch.compile ({args.compile_backend}) vs eager, 224², CPU, {torch.get_num_threads()} threads, '
                f'{args.timer} time, median of {args.repeats} interleaved (speed-up = eager / compiled)', rows,
                args.out)


SUITES = {'models': suite_models, 'agent': suite_agent, 'sparsifiner': suite_sparsifiner, 'train': suite_train,
          'compile': suite_compile}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--suite', nargs='+', default=['models'], choices=sorted(SUITES), help='what to measure')
    p.add_argument('--model', nargs='*', default=['*'], help='model patterns for the models suite')
    p.add_argument('--agent-models', nargs='*', default=['agent_deit_tiny', 'agent_pvt_tiny', 'agent_swin_tiny',
                                                           'agent_cswin_tiny'], help='models for the agent suite')
    p.add_argument('--img-size', type=int, nargs='*', default=None, help='resolutions for the models suite')
    p.add_argument('-b', '--batch-size', type=int, default=8, help='batch size at 224²')
    p.add_argument('--repeats', type=int, default=5, help='timed repetitions (median reported)')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0 = default)')
    p.add_argument('--official-dir', nargs='+', default=None,
                   help='checkouts of the official repositories, any of: Agent-Attention (agent and train suites), '
                        'SAT, Sparsifiner, TAPADL (train suite); each is recognised by its layout')
    p.add_argument('--output', default='output/benchmark', help='folder for benchmark.json and CSV tables')
    p.add_argument('--train-models', nargs='*', default=TRAIN_MODELS, help='models for the train suite')
    p.add_argument('--compile-models', nargs='*', default=['agent_deit_tiny', 'agent_pvt_tiny', 'agent_swin_tiny',
                                                           'agent_cswin_tiny'], help='models for the compile suite')
    p.add_argument('--compile-backend', default='inductor',
                   help="compile suite: torch.compile backend ('inductor'; 'aot_eager' checks the graphs only)")
    p.add_argument('--train-img-size', type=int, nargs='+', default=[224, 448],
                   help='resolutions for the train suite (batch: -b up to 224², shrunk with the token count above)')
    p.add_argument('--train-dtypes', nargs='+', default=['fp32', 'bf16'], choices=['fp32', 'bf16'],
                   help='train suite: fp32, and/or bf16 autocast')
    p.add_argument('--train-opt', default='none', choices=['none', 'sgd', 'adamw'],
                   help='train suite: optimizer step after backward (none: forward + loss + backward only)')
    p.add_argument('--train-linear', default='onednn', choices=['onednn', 'aten'],
                   help="train suite: vitzoo's linear layers with oneDNN training GEMMs (default) or aten's F.linear "
                        '(the ablation: how much of the speed-up is the GEMM backend)')
    p.add_argument('--train-breakdown', action='store_true',
                   help='train suite: also profile each step (torch.profiler) and split it into GEMMs, compute '
                        'kernels (LayerNorm, GELU, softmax, SDPA, convolutions), casts, adds / sums and the rest, '
                        'with the speed-up ceiling left to vitzoo if that rest cost nothing')
    p.add_argument('--no-train-memory', dest='train_memory', action='store_false',
                   help='train suite: skip the peak-memory probes (one child process per candidate)')
    p.add_argument('--timer', default='wall', choices=sorted(CLOCKS),
                   help='train suite clock: wall, or cpu (process CPU time: steadier on a shared machine with '
                        '--threads 1)')
    p.add_argument('--_memory-probe', nargs=3, default=None, help=argparse.SUPPRESS)
    p.add_argument('--_train-probe', nargs=5, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_onednn_training(args.train_linear == 'onednn')
    if args._train_probe:
        name, size, which, batch, dtype = args._train_probe
        _train_probe(name, int(size), which, int(batch), dtype, args)
        return 0
    if args._memory_probe:
        name, size, which = args._memory_probe
        _memory_probe(name, int(size), which, args.official_dir)
        return 0
    args.out = Path(args.output)
    args.out.mkdir(parents=True, exist_ok=True)
    results = dict(torch=torch.__version__, timm=timm.__version__, threads=torch.get_num_threads(),
                   batch_size=args.batch_size, repeats=args.repeats, train_linear=args.train_linear)
    print(f"vitzoo benchmark | torch {results['torch']} | timm {results['timm']} | {results['threads']} threads")
    for s in args.suite:
        SUITES[s](args, results)
    (args.out / 'benchmark.json').write_text(json.dumps(results, indent=2))
    print(f'\nresults: {args.out / "benchmark.json"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
