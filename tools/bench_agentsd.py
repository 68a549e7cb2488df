#!/usr/bin/env python3
"""AgentSD speed on this machine: patched self-attention vs diffusers' default, a whole UNet step, and vs ToMe.

Random weights with the real SD-1.5 UNet configuration (built from its config dict: nothing is downloaded), fp32, on
the CPU unless ``--device`` / ``--dtype`` say otherwise. Every measurement is repeated with the variants interleaved in
palindromic rounds (a linear drift of the machine load cancels) and the median is reported.

On a shared machine, OpenMP threads measure the scheduler as much as the kernels: compare ``--threads 1`` (pure
compute), the default and ``--omp-passive`` (idle OpenMP workers sleep instead of spinning).

(a) attention alone, the first SD-1.5 level (320 channels, 8 heads of 40) at 64x64 and 128x128 latents (4096 / 16384
    tokens): diffusers' ``AttnProcessor2_0`` vs AgentSD (matching + merge + agent attention + unmerge; the paper's
    steps 0-19 settings sx = sy = 4, ratio 0.4, agent_ratio 0.95) vs the tomesd-equivalent mode (same merge, agents
    off).
(b) one UNet step at a 128x128 latent (1024x1024 px): ``t_default``, ``t_patched`` (AgentSD, max_downsample 1),
    ``t_tome`` and ``t_bound``: the same UNet with the patched blocks' self-attention replaced by its linear
    projections only (q, k, v and out projections, no attention): the most any attention patch can save. Reported:
    the share of the removable time actually saved, ``(t_default - t_patched) / (t_default - t_bound)``.

Examples::

    python tools/bench_agentsd.py                       # both parts, markdown tables on stdout
    python tools/bench_agentsd.py --skip-unet --attn-repeats 9 --threads 1
    python tools/bench_agentsd.py --omp-passive
    python tools/bench_agentsd.py --json bench.json --unet-repeats 1
    python tools/bench_agentsd.py --device cuda --dtype fp16 --batch 2   # a GPU, one image with CFG
"""
import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

if __name__ == '__main__' and '--omp-passive' in sys.argv:
    # Must be set before torch starts OpenMP. On an oversubscribed machine, idle OpenMP workers that spin after every
    # parallel op burn the process's share of the cores: that costs a patch made of many small ops far more than one
    # big SDPA call. Passive waiting removes that effect (and slows the big SDPA call somewhat).
    os.environ['OMP_WAIT_POLICY'] = 'PASSIVE'

import torch  # noqa: E402

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


SD15_UNET_CONFIG = {
    'act_fn': 'silu', 'attention_head_dim': 8, 'block_out_channels': [320, 640, 1280, 1280],
    'center_input_sample': False, 'cross_attention_dim': 768,
    'down_block_types': ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
    'downsample_padding': 1, 'flip_sin_to_cos': True, 'freq_shift': 0, 'in_channels': 4, 'layers_per_block': 2,
    'mid_block_scale_factor': 1, 'norm_eps': 1e-05, 'norm_num_groups': 32, 'out_channels': 4, 'sample_size': 64,
    'up_block_types': ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'],
}
EARLY = dict(sx=4, sy=4, ratio=0.4, agent_ratio=0.95)


DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('Examples::')[0].strip(),
                                epilog='examples:' + __doc__.split('Examples::')[1], formatter_class=_HelpFormatter)
    p.add_argument('--latents', type=int, nargs='+', default=[64, 128], help='latent sides for part (a)')
    p.add_argument('--unet-latent', type=int, default=128, help='latent side for part (b) (128 = 1024x1024 px)')
    p.add_argument('--batch', type=int, default=1, help='batch size (2 = one image with classifier-free guidance)')
    p.add_argument('--attn-repeats', type=int, default=7, help='timed rounds per variant in part (a)')
    p.add_argument('--unet-repeats', type=int, default=2, help='timed UNet steps per variant in part (b)')
    p.add_argument('--skip-attn', action='store_true', help='skip part (a)')
    p.add_argument('--skip-unet', action='store_true', help='skip part (b)')
    p.add_argument('--no-tome', action='store_true', help='skip the tomesd-equivalent mode in part (b)')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0 = leave the default)')
    p.add_argument('--device', default='cpu', help='torch device')
    p.add_argument('--dtype', default='fp32', choices=sorted(DTYPES),
                   help='weights and activations (fp16 on a GPU; the README figures are fp32 on the CPU)')
    p.add_argument('--seed', type=int, default=0, help='seed of the random weights and inputs')
    p.add_argument('--json', default=None, help='also write the raw timings to this JSON file')
    p.add_argument('--omp-passive', action='store_true',
                   help='run with OMP_WAIT_POLICY=PASSIVE (fairer on an oversubscribed, shared machine)')
    return p.parse_args(argv)


def _sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def interleaved(
        fns: Dict[str, Callable[[], object]],
        repeats: int,
        device: str,
        warmup: bool = True,
) -> Dict[str, List[float]]:
    """Seconds per call of every variant, interleaved in palindromic rounds (A B C, C B A, A B C, ...).

    Over every pair of rounds each variant sits at the same mean time, so a linear drift of the machine load (other
    jobs starting or ending) cancels instead of favouring the variants measured later.
    """
    names = list(fns)
    if warmup:
        for n in names:
            fns[n]()
    times: Dict[str, List[float]] = {n: [] for n in names}
    for i in range(repeats):
        for n in (names if i % 2 == 0 else names[::-1]):
            _sync(device)
            t = time.perf_counter()
            fns[n]()
            _sync(device)
            times[n].append(time.perf_counter() - t)
    return times


def median(xs: List[float]) -> float:
    return statistics.median(xs)


class ProjectionsOnlyProcessor:
    """t_bound: keep attn1's q/k/v/out projections on all tokens, drop the attention itself (output = to_out(v))."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        attn.to_q(hidden_states)
        attn.to_k(hidden_states)
        v = attn.to_v(hidden_states)
        return attn.to_out[1](attn.to_out[0](v))


@torch.no_grad()
def bench_attention(args: argparse.Namespace) -> List[dict]:
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    from vitzoo.diffusers import agentsd_self_attention
    from vitzoo.layers.token_merging import bipartite_soft_matching_2d
    from vitzoo.layers.workspace import Workspace

    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    attn = Attention(query_dim=320, heads=8, dim_head=40, bias=False, out_bias=True).to(args.device, dtype).eval()
    attn.set_processor(AttnProcessor2_0())
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for side in args.latents:
        n = side * side
        x = torch.randn(args.batch, n, 320, device=args.device, dtype=dtype)  # attention input (norm1 of the input)
        metric = torch.randn(args.batch, n, 320, device=args.device, dtype=dtype)  # block input: the merge metric
        use_gen = gen if args.batch % 2 == 0 else None  # ToMeSD: no random dst for odd batches

        def agentsd(agent_ratio):
            cache = {}  # what AgentSDAttnProcessor keeps per attention: the concatenated q/k/v weight
            workspace = Workspace()  # ... and what the processors of one patch share: reused scratch tensors

            def run():
                tm = bipartite_soft_matching_2d(metric, (side, side), EARLY['sx'], EARLY['sy'], int(n * EARLY['ratio']),
                                                int(n * agent_ratio), generator=use_gen)
                return agentsd_self_attention(attn, x, tm, cache=cache, workspace=workspace)
            return run

        fns = {'default': lambda: attn(x), 'agentsd': agentsd(EARLY['agent_ratio']), 'tome': agentsd(0.0)}
        repeats = args.attn_repeats if side <= 64 else max(4, (args.attn_repeats + 1) // 2)
        t = interleaved(fns, repeats, args.device)
        m = {k: median(v) for k, v in t.items()}
        rows.append(dict(latent=side, tokens=n, t_default=m['default'], t_agentsd=m['agentsd'], t_tome=m['tome'],
                         speedup=m['default'] / m['agentsd'], speedup_tome=m['default'] / m['tome'],
                         agentsd_vs_tome=m['tome'] / m['agentsd'], raw=t))
        print(f'  (a) {side}x{side}: default {m["default"]:.3f}s  agentsd {m["agentsd"]:.3f}s  tome {m["tome"]:.3f}s',
              file=sys.stderr, flush=True)
    return rows


@torch.no_grad()
def bench_unet(args: argparse.Namespace) -> dict:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from vitzoo.diffusers import apply_patch, patch_info, remove_patch

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    dtype = DTYPES[args.dtype]
    unet = UNet2DConditionModel.from_config(SD15_UNET_CONFIG).to(args.device, dtype).eval()
    unet.set_attn_processor(AttnProcessor2_0())
    print(f'  (b) SD-1.5 UNet built in {time.perf_counter() - t0:.1f}s', file=sys.stderr, flush=True)
    side = args.unet_latent
    sample = torch.randn(args.batch, 4, side, side, device=args.device, dtype=dtype)
    context = torch.randn(args.batch, 77, 768, device=args.device, dtype=dtype)

    def step():
        return unet(sample, 500, encoder_hidden_states=context).sample

    # Which blocks AgentSD patches at this latent (max_downsample=1): read back from a small patched call.
    apply_patch(unet, seed=args.seed, **EARLY)
    unet(torch.randn(args.batch, 4, 32, 32, device=args.device, dtype=dtype), 500, encoder_hidden_states=context)
    patched = [name for name, info in patch_info(unet).items() if info['mode'] != 'off']
    remove_patch(unet)
    originals = dict(unet.attn_processors)
    bound_procs = {k: (ProjectionsOnlyProcessor() if k[:-len('.processor')] in patched else v)
                   for k, v in originals.items()}

    def variant(kind):
        def run():
            if kind == 'default':
                return step()
            if kind == 'bound':
                unet.set_attn_processor(dict(bound_procs))
                try:
                    return step()
                finally:
                    unet.set_attn_processor(dict(originals))
            apply_patch(unet, seed=args.seed, **{**EARLY, **({'agent_ratio': 0.0} if kind == 'tome' else {})})
            try:
                return step()
            finally:
                remove_patch(unet)
        return run

    kinds = ['default', 'patched', 'bound'] + ([] if args.no_tome else ['tome'])
    fns = {k: variant(k) for k in kinds}
    t = interleaved(fns, args.unet_repeats, args.device, warmup=False)
    m = {k: median(v) for k, v in t.items()}
    res = dict(latent=side, batch=args.batch, patched_blocks=len(patched), t_default=m['default'],
               t_patched=m['patched'], t_bound=m['bound'], t_tome=m.get('tome'),
               share_saved=(m['default'] - m['patched']) / (m['default'] - m['bound']),
               speedup=m['default'] / m['patched'], bound_speedup=m['default'] / m['bound'], raw=t)
    if 'tome' in m:
        res['share_saved_tome'] = (m['default'] - m['tome']) / (m['default'] - m['bound'])
    res['share_saved_per_round'] = [(d - p) / (d - b) for d, p, b in zip(t['default'], t['patched'], t['bound'])]
    return res


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = os.environ.get('OMP_WAIT_POLICY', 'default')
    out = dict(device=args.device, dtype=args.dtype, threads=torch.get_num_threads(), batch=args.batch,
               torch=torch.__version__, omp_wait_policy=policy)
    print(f'device {args.device}, {torch.get_num_threads()} threads (OMP_WAIT_POLICY={policy}), {args.dtype}, batch '
          f'{args.batch}, random weights, SD-1.5 shapes; medians of interleaved repeats; AgentSD settings sx=sy=4, '
          'ratio 0.4, agent_ratio 0.95\n')
    if not args.skip_attn:
        rows = bench_attention(args)
        out['attention'] = rows
        print('(a) self-attention alone (320 channels, 8 heads)\n')
        print('| latent | tokens | default (s) | AgentSD (s) | ToMe (s) | AgentSD speed-up | ToMe speed-up '
              '| AgentSD vs ToMe |')
        print('|---|---|---|---|---|---|---|---|')
        for r in rows:
            print(f'| {r["latent"]}x{r["latent"]} | {r["tokens"]} | {r["t_default"]:.3f} | {r["t_agentsd"]:.3f} '
                  f'| {r["t_tome"]:.3f} | {r["speedup"]:.2f}x | {r["speedup_tome"]:.2f}x '
                  f'| {r["agentsd_vs_tome"]:.2f}x |')
        print()
    if not args.skip_unet:
        r = bench_unet(args)
        out['unet'] = r
        px = r['latent'] * 8
        print(f'(b) one SD-1.5 UNet step at {px}x{px} (latent {r["latent"]}x{r["latent"]}, {r["patched_blocks"]} '
              'patched blocks)\n')
        print('| t_default (s) | t_patched (s) | t_bound (s) | t_tome (s) | speed-up | bound speed-up '
              '| share of removable time saved | ToMe share |')
        print('|---|---|---|---|---|---|---|---|')
        tome = f'{r["t_tome"]:.2f}' if r.get('t_tome') is not None else '-'
        tome_share = f'{r["share_saved_tome"]:.2f}' if 'share_saved_tome' in r else '-'
        print(f'| {r["t_default"]:.2f} | {r["t_patched"]:.2f} | {r["t_bound"]:.2f} | {tome} | {r["speedup"]:.3f}x '
              f'| {r["bound_speedup"]:.3f}x | {r["share_saved"]:.2f} | {tome_share} |')
        print(f'\nshare of removable time saved, per round: '
              f'{", ".join(f"{x:.2f}" for x in r["share_saved_per_round"])}\n')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == '__main__':
    main(sys.argv[1:])
