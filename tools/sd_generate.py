#!/usr/bin/env python3
"""Text-to-image with and without AgentSD from one local diffusers pipeline folder, side by side.

Loads ``PIPELINE_DIR`` offline (``from_pretrained(..., local_files_only=True)``; any UNet pipeline: SD 1.x, SD 2.x,
SDXL), generates the same prompt(s) from the same seed with the unpatched pipeline, with AgentSD (the paper's
recommended schedule unless ``--schedule none``) and optionally with the tomesd-equivalent mode (``--tome``), saves one
PNG with the images side by side (rows = images of the batch, columns = methods) and prints the seconds per image.
The recommended schedule: steps 0-19 sx=sy=4, ratio 0.4, agent_ratio 0.95; later steps sx=sy=2, ratio 0.4,
agent_ratio 0.5 (for SDXL pass --max-downsample 2: it has no attention at full latent resolution).

Examples::

    python tools/sd_generate.py ./stable-diffusion-v1-5 --prompt "a photo of an astronaut riding a horse"
    python tools/sd_generate.py ./sd21 --dtype fp16 --device cuda --attn-precision fp32 --steps 50
    python tools/sd_generate.py ./sdxl --max-downsample 2 --height 1024 --width 1024 --tome
"""
import argparse
import json
import os
import sys
import time
from typing import List, Optional, Sequence

import torch

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


_DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split('Examples::')[0].strip(),
        epilog='examples:' + __doc__.split('Examples::')[1], formatter_class=_HelpFormatter)
    p.add_argument('pipeline_dir', help='local diffusers pipeline folder (with model_index.json)')
    g = p.add_argument_group('generation')
    g.add_argument('--prompt', default='a photo of a cat sitting on a wooden table', help='text prompt')
    g.add_argument('--negative-prompt', default=None, help='negative prompt (used when --guidance > 1)')
    g.add_argument('--steps', type=int, default=50, help='number of inference steps')
    g.add_argument('--guidance', type=float, default=7.5, help='classifier-free guidance scale')
    g.add_argument('--height', type=int, default=None, help='image height in px (default: the pipeline default)')
    g.add_argument('--width', type=int, default=None, help='image width in px (default: the pipeline default)')
    g.add_argument('--batch', type=int, default=1, help='images per prompt')
    g.add_argument('--seed', type=int, default=0, help='seed of the initial latents (and of AgentSD\'s dst RNG)')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    g.add_argument('--dtype', choices=sorted(_DTYPES), default='fp32', help='pipeline dtype')
    g.add_argument('--warmup', action='store_true', help='run one untimed 1-step generation first')
    a = p.add_argument_group('AgentSD')
    a.add_argument('--ratio', type=float, default=0.4, help='fraction of tokens merged away before self-attention')
    a.add_argument('--agent-ratio', type=float, default=0.95, help='fraction merged away for the agent tokens')
    a.add_argument('--sx', type=int, default=4, help='dst stride along x')
    a.add_argument('--sy', type=int, default=4, help='dst stride along y')
    a.add_argument('--max-downsample', type=int, default=1,
                   help='patch blocks with at most this downsample (SDXL: use 2)')
    a.add_argument('--k-scale2', type=float, default=0.3, help='exponent of the scale in the query->agent softmax')
    a.add_argument('--k-shortcut', type=float, default=0.075, help='weight of the V shortcut')
    a.add_argument('--attn-precision', choices=['fp32'], default=None, help='fp32 attention (SD 2.x in fp16)')
    a.add_argument('--schedule', choices=['recommended', 'none'], default='recommended',
                   help='recommended: switch to sx=sy=2, agent_ratio 0.5 at --switch-step; none: fixed settings')
    a.add_argument('--switch-step', type=int, default=20, help='first step of the late settings of the schedule')
    a.add_argument('--no-rand', action='store_true', help='dst at the top-left of every cell (no random position)')
    a.add_argument('--tome', action='store_true', help='also generate with the tomesd-equivalent mode (agents off)')
    o = p.add_argument_group('output')
    o.add_argument('--out', default='agentsd_side_by_side.png', help='output PNG (columns: baseline, AgentSD[, ToMe])')
    return p.parse_args(argv)


def load_pipeline(path: str, dtype: torch.dtype, device: str):
    """``DiffusionPipeline.from_pretrained`` offline; no safety checker when the folder has one."""
    import diffusers
    from diffusers import DiffusionPipeline
    if not os.path.isfile(os.path.join(path, 'model_index.json')):
        raise SystemExit(f'sd_generate: {path!r} is not a diffusers pipeline folder (no model_index.json)')
    with open(os.path.join(path, 'model_index.json')) as f:
        index = json.load(f)
    kwargs = dict(local_files_only=True)
    if 'safety_checker' in index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    version = tuple(int(v) for v in diffusers.__version__.split('.')[:2] if v.isdigit())
    kwargs['dtype' if version >= (0, 40) else 'torch_dtype'] = dtype  # torch_dtype is deprecated since 0.40
    pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def side_by_side(columns: List[List['PIL.Image.Image']], gap: int = 4):
    """One image: column c = the images of method c, one row per image of the batch."""
    from PIL import Image
    rows = len(columns[0])
    w, h = columns[0][0].size
    canvas = Image.new('RGB', (len(columns) * w + (len(columns) - 1) * gap, rows * h + (rows - 1) * gap), 'white')
    for c, images in enumerate(columns):
        for r, im in enumerate(images):
            canvas.paste(im, (c * (w + gap), r * (h + gap)))
    return canvas


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    from vitzoo.diffusers import AgentSDSchedule, apply_patch, remove_patch

    pipe = load_pipeline(args.pipeline_dir, _DTYPES[args.dtype], args.device)
    if getattr(pipe, 'unet', None) is None:
        raise SystemExit(f'sd_generate: {type(pipe).__name__} has no UNet; AgentSD supports SD 1.x / 2.x / XL')
    call = dict(prompt=args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                num_images_per_prompt=args.batch)
    if args.negative_prompt is not None:
        call['negative_prompt'] = args.negative_prompt
    if args.height is not None:
        call['height'] = args.height
    if args.width is not None:
        call['width'] = args.width

    def generate(callback=None):
        gen = torch.Generator('cpu').manual_seed(args.seed)
        extra = {} if callback is None else dict(callback_on_step_end=callback)
        if args.device.startswith('cuda'):
            torch.cuda.synchronize()
        t = time.perf_counter()
        images = pipe(generator=gen, **call, **extra).images
        if args.device.startswith('cuda'):
            torch.cuda.synchronize()
        return images, (time.perf_counter() - t) / len(images)

    if args.warmup:
        pipe(**{**call, 'num_inference_steps': 1, 'num_images_per_prompt': 1})
    patch = dict(ratio=args.ratio, agent_ratio=args.agent_ratio, sx=args.sx, sy=args.sy,
                 max_downsample=args.max_downsample, k_scale2=args.k_scale2, k_shortcut=args.k_shortcut,
                 attn_precision=args.attn_precision, use_rand=not args.no_rand, seed=args.seed)
    schedule = AgentSDSchedule(switch_step=args.switch_step) if args.schedule == 'recommended' else None

    results = {}
    columns = []
    images, results['baseline'] = generate()
    columns.append(images)
    apply_patch(pipe, **patch)
    try:
        images, results['agentsd'] = generate(schedule)
        columns.append(images)
        if args.tome:
            apply_patch(pipe, **{**patch, 'agent_ratio': 0.0})  # re-applying replaces the settings
            images, results['tome'] = generate()
            columns.append(images)
    finally:
        remove_patch(pipe)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    side_by_side(columns).save(args.out)
    base = results['baseline']
    print(f'{"method":<10} {"s/img":>9} {"speed-up":>9}')
    for name, sec in results.items():
        print(f'{name:<10} {sec:9.3f} {base / sec:8.2f}x')
    print(f'saved {args.out} (columns: {", ".join(results)})')
    return dict(times=results, out=args.out, size=columns[0][0].size)


if __name__ == '__main__':
    main(sys.argv[1:])
