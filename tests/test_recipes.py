"""Training recipes, evaluation transforms and dense configs equal the official code.

The official values live in ``configs/official/*.yaml`` (each row names its official repository, commit and file);
deliberate differences are ``deviations`` rows there and in ``configs/README.md``.
"""

# ---- training recipes: tools/train.py --print-recipe vs configs/official/train_*.yaml ----------------------------


# ---- evaluation transforms: pretrained cfgs vs configs/official/eval.yaml -----------------------------------------
def _eval_table() -> dict:
    import pathlib
    import yaml
    return yaml.safe_load((pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'official' / 'eval.yaml')
                          .read_text())


def _eval_pretrained_cfgs() -> dict:
    """Every pretrained cfg ('arch.tag') of every vitzoo model, with or without weights."""
    from timm.models import get_arch_pretrained_cfgs
    from vitzoo.utils import list_models
    return {tag: cfg for m in list_models() for tag, cfg in get_arch_pretrained_cfgs(m).items()}


def _eval_readme_rows() -> list:
    """(model, key) of the configs/README.md "Evaluation transforms" table."""
    import pathlib
    text = (pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'README.md').read_text()
    section = text.split('### Evaluation transforms', 1)[1].split('\n#', 1)[0]
    rows = [[c.strip().strip('`') for c in line.strip().strip('|').split('|')]
            for line in section.splitlines() if line.strip().startswith('|')]
    return [(r[0], r[1]) for r in rows[2:] if len(r) >= 2]  # skip the header and the |---| line


def _eval_same(got, want) -> bool:
    import pytest
    if isinstance(want, (list, tuple)):
        return isinstance(got, (list, tuple)) and len(got) == len(want) and all(map(_eval_same, got, want))
    if isinstance(want, float) or isinstance(got, float):
        return got == pytest.approx(want, rel=1e-9)
    return got == want


def test_eval_every_pretrained_cfg_equals_the_official_table():
    table, cfgs = _eval_table(), _eval_pretrained_cfgs()
    assert len(cfgs) >= 50  # every family, incl. the cfgs without released weights
    assert sorted(set(cfgs) - set(table)) == [], 'pretrained cfgs without an entry in configs/official/eval.yaml'
    assert sorted(set(table) - set(cfgs)) == [], 'eval.yaml entries for cfgs that are not registered'
    readme = set(_eval_readme_rows())
    for name, cfg in sorted(cfgs.items()):
        entry = table[name]
        assert '@' in entry['source'] and '/' in entry['source'], f'{name}: source must name repo@commit: file'
        assert {'crop_pct', 'crop_mode', 'interpolation', 'mean', 'std', 'input_size'} <= set(entry['official'])
        deviations = entry.get('deviations') or {}
        for key, want in entry['official'].items():
            if key in deviations:
                want = deviations[key]['ours']
                assert deviations[key].get('reason'), f'{name}.{key}: a deviation needs a reason'
                assert (name, key) in readme, f'{name}.{key} deviates but configs/README.md has no row for it'
            got = getattr(cfg, key)
            assert _eval_same(got, want), f'{name}: pretrained cfg {key}={got!r}, official {want!r}'


def test_eval_agent_resize_formula_equals_timm_squash_scale():
    # build.py: s = int((256 / 224) * IMG_SIZE); timm 'squash': floor(img / crop_pct) at crop_pct 0.875
    import math
    for img in (224, 256, 288, 384, 448):
        assert int((256 / 224) * img) == math.floor(img / 0.875), img


def _eval_official_pipeline(p: dict, mean, std):
    """The official torchvision eval steps described by an eval.yaml ``pipeline`` row."""
    from torchvision import transforms as T
    interp = T.InterpolationMode(p['interpolation'])
    size = tuple(p['resize']) if isinstance(p['resize'], list) else int(p['resize'])
    steps = [T.Resize(size, interpolation=interp)]
    if p['center_crop'] is not None:
        steps.append(T.CenterCrop(int(p['center_crop'])))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def test_eval_timm_transform_of_each_cfg_equals_the_official_pipeline():
    """timm's eval transform built from each distinct cfg == the official torchvision pipeline, pixel for pixel."""
    import json
    import numpy as np
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[0:301, 0:457]
    base = np.stack([xx * 255 // 456, yy * 255 // 300, (xx + yy) % 256], -1)
    land = np.clip(base + rng.randint(-40, 41, base.shape), 0, 255).astype(np.uint8)
    images = [Image.fromarray(land), Image.fromarray(np.ascontiguousarray(land.transpose(1, 0, 2)))]  # 457x301, 301x457

    table, cfgs = _eval_table(), _eval_pretrained_cfgs()
    kinds = {}
    for name, entry in sorted(table.items()):
        d = resolve_data_config({}, pretrained_cfg=cfgs[name].to_dict())
        kinds.setdefault(json.dumps([entry['pipeline'], {k: d[k] for k in sorted(d)}], sort_keys=True,
                                    default=list), (name, entry, d))
    assert len(kinds) >= 8  # Agent squash 224/256/384/448, Agent no-crop 288/384, FAN, RVT/Sparsifiner, SAT
    for name, entry, d in kinds.values():
        ours = create_transform(**d)
        official = _eval_official_pipeline(entry['pipeline'], entry['official']['mean'], entry['official']['std'])
        for img in images:
            a, b = ours(img), official(img)
            assert a.shape == b.shape == (3, *d['input_size'][1:]), name
            assert torch.allclose(a, b, rtol=0, atol=1e-6), f'{name}: max |diff| {(a - b).abs().max():.3g}'

    # the images tell the modes apart: the old aspect-preserving cfg of Agent-DeiT-S (center, 0.875) is not official
    entry = table['agent_deit_small.in1k']
    d = resolve_data_config({}, pretrained_cfg=cfgs['agent_deit_small.in1k'].to_dict())
    official = _eval_official_pipeline(entry['pipeline'], entry['official']['mean'], entry['official']['std'])
    assert not torch.allclose(create_transform(**dict(d, crop_mode='center'))(images[0]), official(images[0]),
                              atol=1e-3)


# ---- dense configs: mmengine Config.fromfile vs configs/official/mm.yaml ------------------------------------------
