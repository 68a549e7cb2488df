#!/usr/bin/env python3
"""vitzoo benchmark: params, GFLOPs and speed of vitzoo models, as ratios against baselines measured in the same run.

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
  sparsifiner Sparsifiner latency vs timm deit_small_patch16_224, and its analytic MHSA FLOPs (kept entries only).

Every timing is the median of ``--repeats`` interleaved measurements, so the ratios printed are robust to a noisy
machine. Results are printed as tables and written to ``<output>/benchmark.json`` (and one CSV per table).

Examples:
    python tools/benchmark.py --suite models --model 'agent_*' --img-size 224 448
    python tools/benchmark.py --suite agent --official-dir ~/src/Agent-Attention -b 8
"""
import argparse
import csv
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

import timm
import vitzoo  # noqa: F401  (registers the models)
from vitzoo.utils import count_macs, count_params, list_models


# ----------------------------------------------------------------------------------------------------------------------
# timing helpers


def time_fn(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_interleaved(fns: Dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> Dict[str, float]:
    """Median seconds of each function, calls interleaved so that load changes hit every candidate alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


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


def import_official(official_dir: str) -> types.SimpleNamespace:
    """Import the official agent_{deit,pvt,swin,cswin}.py from a checkout, with the shims they need on timm 1.x."""
    root = Path(official_dir).expanduser()
    models = root / 'agent_transformer' / 'models' if (root / 'agent_transformer').is_dir() else root
    needed = ['agent_deit.py', 'deit.py', 'agent_pvt.py', 'agent_swin.py', 'agent_cswin.py']
    missing = [n for n in needed if not (models / n).is_file()]
    if missing:
        raise FileNotFoundError(f'--official-dir {official_dir}: {models} lacks {", ".join(missing)}')
    import warnings
    warnings.filterwarnings('ignore', category=FutureWarning)
    import timm.models.registry as registry
    registry.register_model = lambda fn: fn  # the official deit cfgs do not parse under timm >= 0.9
    pkg = types.ModuleType('agent_official')
    pkg.__path__ = [str(models)]
    sys.modules['agent_official'] = pkg
    ns = types.SimpleNamespace()
    for name in ('agent_deit', 'agent_pvt', 'agent_swin', 'agent_cswin'):
        setattr(ns, name, importlib.import_module(f'agent_official.{name}'))
    return ns


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
    off = import_official(args.official_dir) if args.official_dir else None

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


def _peak_rss(name: str, size: int, which: str, official_dir: Optional[str]) -> float:
    cmd = [sys.executable, __file__, '--_memory-probe', name, str(size), which]
    if official_dir:
        cmd += ['--official-dir', official_dir]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ)).stdout
    return round(float(out.strip().splitlines()[-1]), 1)


def _memory_probe(name: str, size: int, which: str, official_dir: Optional[str]) -> None:
    """Child process: build the model, then print the RSS growth (MiB) caused by one forward."""
    if which == 'official':
        model = official_builders(import_official(official_dir))[name](size).eval()
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


def suite_sparsifiner(args, results: Dict) -> None:
    mod = importlib.import_module('vitzoo.models.sparsifiner')
    rows = []
    x = torch.randn(args.batch_size, 3, 224, 224)
    dense = timm.create_model('deit_small_patch16_224').eval()
    cands = {'deit_small_patch16_224': dense}
    for name in list_models('sparsifiner_deit_small*'):
        cands[name] = timm.create_model(name).eval()
    if hasattr(mod, 'sparsifiner_deit_small'):
        cands['sparsifiner_deit_small (token-sparse)'] = timm.create_model(
            'sparsifiner_deit_small', **getattr(mod, 'TOKEN_SPARSE_KWARGS', {})).eval()
    with torch.no_grad():
        t = time_interleaved({k: (lambda m=m: m(x)) for k, m in cands.items()}, repeats=args.repeats)
    flops_fn = getattr(mod, 'sparsifiner_flops', None)
    for k, m in cands.items():
        row = dict(model=k, ms_per_img=round(t[k] / args.batch_size * 1e3, 2),
                   latency_vs_deit_s=round(t[k] / t['deit_small_patch16_224'], 2))
        if flops_fn is not None and k != 'deit_small_patch16_224':
            f = flops_fn(m, (3, 224, 224))
            row.update({kk: (round(v / 1e9, 3) if isinstance(v, (int, float)) else v) for kk, v in f.items()})
        rows.append(row)
    results['sparsifiner'] = rows
    print_table('sparsifiner vs dense DeiT-S (CPU, fp32, batch %d, 224)' % args.batch_size, rows, args.out)


SUITES = {'models': suite_models, 'agent': suite_agent, 'sparsifiner': suite_sparsifiner}


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
    p.add_argument('--official-dir', default=None, help='checkout of LeapLabTHU/Agent-Attention (agent suite)')
    p.add_argument('--output', default='output/benchmark', help='folder for benchmark.json and CSV tables')
    p.add_argument('--_memory-probe', nargs=3, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory_probe:
        name, size, which = args._memory_probe
        _memory_probe(name, int(size), which, args.official_dir)
        return 0
    args.out = Path(args.output)
    args.out.mkdir(parents=True, exist_ok=True)
    results = dict(torch=torch.__version__, timm=timm.__version__, threads=torch.get_num_threads(),
                   batch_size=args.batch_size, repeats=args.repeats)
    print(f"vitzoo benchmark | torch {results['torch']} | timm {results['timm']} | {results['threads']} threads")
    for s in args.suite:
        SUITES[s](args, results)
    (args.out / 'benchmark.json').write_text(json.dumps(results, indent=2))
    print(f'\nresults: {args.out / "benchmark.json"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
