"""Training recipes, evaluation transforms and dense configs equal the official code.

The official values live in ``configs/official/*.yaml`` (each row names its official repository, commit and file);
deliberate differences are ``deviations`` rows there and in ``configs/README.md``.
"""

# ---- training recipes: tools/train.py --print-recipe vs configs/official/train_*.yaml ----------------------------
import importlib.util as _train_importlib_util  # noqa: E402
import pathlib as _train_pathlib  # noqa: E402

import pytest as _train_pytest  # noqa: E402

_TRAIN_ROOT = _train_pathlib.Path(__file__).resolve().parents[1]
_TRAIN_CONFIGS = _TRAIN_ROOT / 'configs' / 'train'


def _train_tool():
    """tools/train.py as a module (run in-process: one timm import for all the configs)."""
    path = _TRAIN_ROOT / 'tools' / 'train.py'
    spec = _train_importlib_util.spec_from_file_location('vitzoo_train_tool_recipes', path)
    module = _train_importlib_util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_entries() -> list:
    """[(official table file name, config stem, entry)] over every configs/official/train_*.yaml."""
    import yaml
    return [(path.name, stem, entry) for path in sorted((_TRAIN_ROOT / 'configs' / 'official').glob('train_*.yaml'))
            for stem, entry in (yaml.safe_load(path.read_text()) or {}).items()]


def _train_tables() -> dict:
    """{config stem: (official table file name, entry)}."""
    return {stem: (table, entry) for table, stem, entry in _train_entries()}


def _train_readme_rows() -> set:
    """(config, key) of the configs/README.md "Training recipes" table."""
    text = (_TRAIN_ROOT / 'configs' / 'README.md').read_text()
    section = text.split('### Training recipes', 1)[1].split('\n#', 1)[0]
    rows = [[c.strip().strip('`') for c in line.strip().strip('|').split('|')]
            for line in section.splitlines() if line.strip().startswith('|')]
    return {(r[0], r[1]) for r in rows[2:] if len(r) >= 2}  # skip the header and the |---| line


def _train_flat(d: dict, prefix: str = '') -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_train_flat(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


def _train_same(got, want) -> bool:
    if isinstance(want, bool) or isinstance(got, bool) or want is None or got is None:
        return got is want
    if isinstance(want, (list, tuple)):
        return isinstance(got, (list, tuple)) and len(got) == len(want) and all(map(_train_same, got, want))
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        return got == _train_pytest.approx(want, rel=1e-9, abs=0)
    return got == want


@_train_pytest.fixture(scope='module')
def train_tool():
    return _train_tool()


def _print_recipe(tool, capsys, argv) -> dict:
    """Run ``train.py ARGV --print-recipe`` in-process; the printed text must be the one JSON object returned."""
    import json
    capsys.readouterr()
    recipe = tool.main([*argv, '--print-recipe'])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(recipe))
    return printed


def test_train_every_config_has_an_official_entry():
    tables = _train_tables()
    stems = [stem for _, stem, _ in _train_entries()]
    assert sorted({s for s in stems if stems.count(s) > 1}) == [], 'configs with entries in two official tables'
    configs = {p.stem for p in _TRAIN_CONFIGS.glob('*.yaml') if not p.stem.startswith('demo_')}
    assert len(configs) >= 30
    assert sorted(configs - set(tables)) == [], 'configs/train files without a configs/official/train_*.yaml entry'
    assert sorted(set(tables) - configs) == [], 'official entries without a configs/train file'
    readme = _train_readme_rows()
    for stem, (table, entry) in tables.items():
        assert '@' in entry.get('source', '') and '/' in entry['source'], f'{table}: {stem}: source repo@commit: file'
        assert ('official' in entry) != ('no_official' in entry), f'{table}: {stem}: official or no_official'
        if 'no_official' in entry:
            assert entry['no_official'].strip(), f'{stem}: no_official must say why'
            assert (stem, '—') in readme, f'{stem} has no official recipe but configs/README.md has no row for it'
        else:
            assert isinstance(entry.get('world_size'), int) and entry['world_size'] >= 1, stem


@_train_pytest.mark.parametrize('stem', sorted(_train_tables()))
def test_train_recipe_equals_the_official_table(stem, train_tool, capsys):
    table, entry = _train_tables()[stem]
    if 'official' not in entry:  # a size the authors never trained: checked by the README row above
        return
    recipe = _train_flat(_print_recipe(train_tool, capsys, ['-c', str(_TRAIN_CONFIGS / f'{stem}.yaml'),
                                                            '--world-size', str(entry['world_size'])]))
    deviations = entry.get('deviations') or {}
    readme = _train_readme_rows()
    assert set(deviations) <= set(entry['official']), f'{table}: {stem}: deviations of keys not in official'
    wrong = []
    for key, want in entry['official'].items():
        if key in deviations:
            assert deviations[key].get('reason'), f'{stem}.{key}: a deviation needs a reason'
            assert (stem, key) in readme, f'{stem}.{key} deviates but configs/README.md has no row for it'
            want = deviations[key]['ours']
        assert key in recipe, f'{stem}: --print-recipe has no {key!r}'
        if not _train_same(recipe[key], want):
            wrong.append(f'{key}: printed {recipe[key]!r}, {table} wants {want!r}')
    assert not wrong, f'{stem}: ' + '; '.join(wrong)


def test_train_print_recipe_cli_touches_no_data(tmp_path):
    import json
    import os
    import subprocess
    import sys
    data = tmp_path / 'no_such_dir'
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(_TRAIN_ROOT))
    # the demo config generates its data set on a run: --print-recipe must not
    res = subprocess.run([sys.executable, str(_TRAIN_ROOT / 'tools' / 'train.py'), '-c',
                          str(_TRAIN_CONFIGS / 'demo_agent_deit.yaml'), '--data-dir', str(data), '--print-recipe',
                          '--world-size', '3'], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    recipe = json.loads(res.stdout)
    assert not data.exists() and list(tmp_path.iterdir()) == []
    required = {'model', 'global_batch', 'lr', 'warmup_lr', 'min_lr', 'weight_decay', 'epochs', 'warmup_epochs',
                'cooldown_epochs', 'sched_on_updates', 'clip_grad', 'drop_path', 'model_ema', 'model_ema_decay',
                'init', 'eval', 'opt', 'sched', 'img_size', 'batch_size'}
    assert required <= set(recipe), sorted(required - set(recipe))
    assert set(recipe['eval']) >= {'crop_pct', 'crop_mode', 'interpolation'}
    assert (recipe['model'], recipe['batch_size'], recipe['global_batch'], recipe['init']) == (
        'agent_deit_tiny', 64, 192, 'scratch')
    assert recipe['eval']['crop_pct'] == 1.0  # the config's crop_pct wins over the model cfg


def test_train_world_size_scales_lr_warmup_lr_and_min_lr(train_tool, capsys):
    from vitzoo.train_utils import TrainError
    cfg = ['-c', str(_TRAIN_CONFIGS / 'agent_pvt_tiny.yaml')]
    r8 = _print_recipe(train_tool, capsys, cfg + ['--world-size', '8'])
    r4 = _print_recipe(train_tool, capsys, cfg + ['--world-size', '4'])
    assert r4['global_batch'] * 2 == r8['global_batch'] == 1024
    for key in ('lr', 'warmup_lr', 'min_lr'):
        assert r4[key] == _train_pytest.approx(r8[key] / 2, rel=1e-12), key
    assert r8['lr'] == _train_pytest.approx(5e-4 * 1024 / 512, rel=1e-12)
    # a per-process batch change scales the same way
    r8b = _print_recipe(train_tool, capsys, cfg + ['--world-size', '8', '-b', '32'])
    assert r8b['lr'] == _train_pytest.approx(r8['lr'] / 4, rel=1e-12)
    # absolute values win and are not scaled; the others still are
    ra = _print_recipe(train_tool, capsys, cfg + ['--world-size', '4', '--lr', '3e-4', '--min-lr', '1e-6'])
    assert (ra['lr'], ra['min_lr']) == (3e-4, 1e-6)
    assert ra['warmup_lr'] == _train_pytest.approx(r4['warmup_lr'], rel=1e-12)
    # the world size of a real run comes from torchrun
    with _train_pytest.raises(TrainError, match='--world-size is only for --print-recipe'):
        train_tool.main(cfg + ['--world-size', '2', '--data-dir', '/nonexistent'])
    # a fine-tune recipe says so, and a run without the weights is refused before touching data
    ft = ['-c', str(_TRAIN_CONFIGS / 'agent_swin_base_384.yaml')]
    assert _print_recipe(train_tool, capsys, ft)['init'] == 'initial-checkpoint'
    with _train_pytest.raises(TrainError, match='fine-tunes given weights: give --initial-checkpoint'):
        train_tool.main(ft + ['--data-dir', '/nonexistent'])


def _official_agent_lr(t: int, lr: float, warmup_lr: float, min_lr: float, warmup_t: int, t_initial: int) -> float:
    """lr at iteration t of the official Agent schedule: lr_scheduler.py's timm 0.4.12 CosineLRScheduler with
    t_initial = EPOCHS * iters, warmup_t = WARMUP_EPOCHS * iters, warmup_prefix False, cycle_limit 1 (min_lr after
    t_initial, i.e. during the COOLDOWN_EPOCHS), written out."""
    import math
    if t < warmup_t:
        return warmup_lr + t * (lr - warmup_lr) / warmup_t
    if t < t_initial:
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / t_initial))
    return min_lr


@_train_pytest.mark.parametrize('stem', ['agent_pvt_tiny', 'agent_swin_base_384', 'agent_cswin_base_384'])
def test_train_agent_schedule_equals_the_official_curve(stem, train_tool):
    """The optimizer and scheduler _train builds (tiny model, no data), stepped as _train steps them, give the
    official per-iteration curve: warmup, cosine over EPOCHS (warmup inside), then COOLDOWN_EPOCHS at min_lr."""
    import torch
    args = train_tool.parse_args(['-c', str(_TRAIN_CONFIGS / f'{stem}.yaml')])
    args.world_size = 8
    recipe = train_tool.resolve_recipe(args)
    iters = 3  # updates per epoch
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = train_tool.build_optimizer(model, args, recipe['lr'])
    assert len(optimizer.param_groups) == 2  # weights decay, biases / norms do not (official set_weight_decay)
    assert sorted(g['weight_decay'] for g in optimizer.param_groups) == [0.0, args.weight_decay]
    scheduler, num_epochs = train_tool.build_scheduler(optimizer, args, recipe, iters)
    assert num_epochs == recipe['epochs'] == args.epochs + args.cooldown_epochs
    lrs, num_updates = [], 0
    for epoch in range(num_epochs):  # the calls _train makes, in its order
        scheduler.step(epoch)
        scheduler.step_update(num_updates)
        for _ in range(iters):
            lrs.append(optimizer.param_groups[0]['lr'])
            num_updates += 1
            scheduler.step_update(num_updates)
        scheduler.step(epoch + 1, 0.0)
    warmup_t, t_initial = args.warmup_epochs * iters, args.epochs * iters
    assert len(lrs) == (args.epochs + args.cooldown_epochs) * iters
    # update k uses the official f(k); the official main.py applies f(k - 1) (it steps with the index of the
    # update just done): one update later, noted in configs/README.md
    for k in sorted({0, 1, max(warmup_t - 1, 0), warmup_t, warmup_t + 1, t_initial // 2, t_initial - 1,
                     min(t_initial, len(lrs) - 1), len(lrs) - 1}):
        want = _official_agent_lr(k, recipe['lr'], recipe['warmup_lr'], recipe['min_lr'], warmup_t, t_initial)
        assert lrs[k] == _train_pytest.approx(want, rel=1e-9), (stem, k)
    assert all(v == _train_pytest.approx(recipe['min_lr'], rel=1e-9) for v in lrs[t_initial:])  # the cooldown
    assert max(lrs) <= recipe['lr'] * (1 + 1e-9) and min(lrs) >= min(recipe['min_lr'], recipe['warmup_lr']) * (1 - 1e-9)


def test_train_run_uses_the_printed_recipe(train_tool, capsys, tmp_path):
    """A real (tiny) run writes recipe.json equal to --print-recipe, and its val transform is the recipe's."""
    import json
    from vitzoo.data.shapes import write_image_folder
    data = write_image_folder(tmp_path / 'shapes', num_train=16, num_val=8, num_classes=2, img_size=40, seed=0,
                              progress=False)
    argv = ['--data-dir', str(data), '--model', 'agent_deit_tiny', '--img-size', '32', '--model-kwargs',
            'patch_size=8', 'embed_dim=32', 'depth=1', 'num_heads=2', 'agent_num=4', '--threads', '1', '-j', '0',
            '-b', '8', '--epochs', '1', '--warmup-epochs', '1', '--sched-on-updates', '--lr-base', '2e-3',
            '--warmup-lr-base', '2e-5', '--min-lr-base', '1e-4', '--lr-base-size', '16', '--crop-mode', 'squash',
            '--crop-pct', '0.8', '--no-aug', '--output', str(tmp_path), '--experiment', 'run']
    printed = _print_recipe(train_tool, capsys, argv)
    assert (printed['lr'], printed['warmup_lr'], printed['min_lr']) == (1e-3, 1e-5, 5e-5)  # batch 8 of 16
    train_tool.main(argv)
    assert json.loads((tmp_path / 'run' / 'recipe.json').read_text()) == printed
    # the val transform: Resize((40, 40)) squashed, then CenterCrop(32) (crop_pct 0.8, squash)
    tf = train_tool.eval_transform(printed)
    names = [type(t).__name__ for t in tf.transforms]
    assert names[:2] == ['Resize', 'CenterCrop'] and tf.transforms[0].size in ((40, 40), [40, 40]), tf


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
import pathlib as _dense_pathlib  # noqa: E402

import pytest as _dense_pytest  # noqa: E402

_DENSE_ROOT = _dense_pathlib.Path(__file__).resolve().parents[1]
_DENSE_MISSING = object()


def _dense_table() -> dict:
    """configs/official/mm.yaml without its ``_shared`` anchors: {'configs/mm*/<file>.py': entry}."""
    import yaml
    table = yaml.safe_load((_DENSE_ROOT / 'configs' / 'official' / 'mm.yaml').read_text())
    return {k: v for k, v in table.items() if not k.startswith('_')}


def _dense_configs() -> list:
    """Every non-demo mmdet / mmseg config, as 'configs/mmdet/<file>.py'."""
    return sorted(str(p.relative_to(_DENSE_ROOT)) for d in ('mmdet', 'mmseg')
                  for p in (_DENSE_ROOT / 'configs' / d).glob('*.py') if not p.stem.endswith('_demo'))


def _dense_readme_rows() -> list:
    """(config, key) of the configs/README.md "Detection / segmentation configs" table."""
    text = (_DENSE_ROOT / 'configs' / 'README.md').read_text()
    section = text.split('### Detection / segmentation configs', 1)[1].split('\n#', 1)[0]
    rows = [[c.strip().strip('`') for c in line.strip().strip('|').split('|')]
            for line in section.splitlines() if line.strip().startswith('|')]
    return [(r[0], r[1]) for r in rows[2:] if len(r) >= 2]  # skip the header and the |---| line


def _dense_load(path: str):
    """mmengine ``Config.fromfile`` after the imports the configs' ``custom_imports`` name."""
    import vitzoo.mmdet  # noqa: F401
    import vitzoo.mmseg  # noqa: F401
    from mmengine.config import Config
    return Config.fromfile(str(_DENSE_ROOT / path))


def _dense_plain(x):
    """Config values as plain data: dicts, lists (tuples too), scalars."""
    if isinstance(x, dict):
        return {k: _dense_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_dense_plain(v) for v in x]
    return x


def _dense_get(obj, parts: list):
    """The value at a dotted path ('a.0.b'); '*' maps the rest of the path over a list."""
    if not parts:
        return obj
    head, rest = parts[0], parts[1:]
    if head == '*':
        if not isinstance(obj, (list, tuple)):
            return _DENSE_MISSING
        return [_dense_get(v, rest) for v in obj]
    if isinstance(obj, (list, tuple)):
        if not head.lstrip('-').isdigit() or not -len(obj) <= int(head) < len(obj):
            return _DENSE_MISSING
        return _dense_get(obj[int(head)], rest)
    if isinstance(obj, dict):
        return _dense_get(obj[head], rest) if head in obj else _DENSE_MISSING
    return _DENSE_MISSING


def _dense_same(got, want) -> bool:
    if want is None:
        return got is None or got is _DENSE_MISSING
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want
    if isinstance(want, dict):
        return isinstance(got, dict) and set(got) == set(want) and all(_dense_same(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(_dense_same, got, want))
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        return got == _dense_pytest.approx(want, rel=1e-9, abs=0)
    return got == want


def _dense_backbone_arch(backbone_cfg: dict) -> dict:
    """The official backbone arguments as the backbone built from the config has them (see mm.yaml's header)."""
    import math
    import torch
    from mmengine.registry import MODELS
    from vitzoo.layers.agent_attention import AgentAttention
    cfg = dict(backbone_cfg, pretrained=None)
    with torch.device('meta'):  # shapes and modules only: no memory, no init cost
        bb = MODELS.build(cfg)
    m = bb.model
    stages = m.layers if hasattr(m, 'layers') else m.stages
    arch = dict(depths=[], num_heads=[], mlp_ratios=[], agent_num=[], embed_dims=[f['num_chs'] for f in m.feature_info])
    letters, mixed, kernels, scales, srs = '', '', set(), set(), ''
    for stage in stages:
        blocks = list(stage.blocks)
        agent = [isinstance(b.attn, AgentAttention) for b in blocks]
        n = sum(agent)
        assert agent == [True] * n + [False] * (len(blocks) - n), 'agent blocks must lead their stage'
        letters += 'A' if n == len(blocks) else 'B' if n == 0 else 'M'
        mixed = str(n) if 0 < n < len(blocks) else mixed
        a = blocks[0].attn
        arch['depths'].append(len(blocks))
        arch['num_heads'].append(a.num_heads)
        arch['mlp_ratios'].append(blocks[0].mlp.fc1.out_features / blocks[0].mlp.fc1.in_features)
        arch['agent_num'].append(a.agent_num if n else None)
        if n:
            kernels.add(a.dwc.kernel_size[0])
            scales.add(round(math.log(a.scale) / math.log(a.head_dim), 9))
            srs += str(a.sr_ratio)
    drop = max((float(mod.drop_prob) for mod in bb.modules() if hasattr(mod, 'drop_prob')), default=0.0)
    arch.update(attn_type=letters + mixed, embed_dim=arch['embed_dims'][0], agent_sr_ratios=srs,
                drop_path_rate=round(drop, 6))  # the rates come from a float32 linspace
    if len(set(arch['mlp_ratios'])) == 1:
        arch['mlp_ratio'] = arch['mlp_ratios'][0]
    if len(kernels) == 1:
        arch['kernel_size'] = kernels.pop()
    if len(scales) == 1:
        arch['scale'] = scales.pop()
    if hasattr(m, 'window_size'):
        arch['window_size'] = m.window_size
    return arch


def test_dense_every_config_has_an_official_entry():
    table, configs = _dense_table(), _dense_configs()
    assert len(configs) >= 24
    assert sorted(set(configs) - set(table)) == [], 'mm configs without an entry in configs/official/mm.yaml'
    assert sorted(set(table) - set(configs)) == [], 'mm.yaml entries for configs that do not exist (or demos)'
    for path, entry in table.items():
        src = entry['source']
        assert ('LeapLabTHU/Agent-Attention@' in src or 'guoyongcs/TAPADL@' in src) and '.py' in src, path
        assert entry['official'], path
    # every README row is a deviation of the table (no stale rows)
    deviations = {(path.split('/')[-1], key) for path, e in table.items() for key in (e.get('deviations') or {})}
    assert set(_dense_readme_rows()) == deviations


@_dense_pytest.mark.parametrize('path', sorted(_dense_table()))
def test_dense_config_equals_the_official_table(path):
    entry = _dense_table()[path]
    cfg = _dense_load(path)
    data = _dense_plain(cfg.to_dict())
    assert data['custom_imports']['imports'][0] in ('vitzoo.mmdet', 'vitzoo.mmseg')
    official, deviations = entry['official'], entry.get('deviations') or {}
    assert set(deviations) <= set(official), f'{path}: deviations must name keys of the official table'
    arch = _dense_backbone_arch(cfg.model.backbone) if any(k.startswith('backbone_arch.') for k in official) else {}
    readme = set(_dense_readme_rows())
    wrong = []
    for key, want in official.items():
        if key in deviations:
            assert deviations[key].get('reason'), f'{path}: the deviation of {key} needs a reason'
            assert (path.split('/')[-1], key) in readme, f'{path}: {key} deviates but configs/README.md has no row'
            want = deviations[key]['ours']
        if key.startswith('backbone_arch.'):
            name = key[len('backbone_arch.'):]
            got = arch.get(name, _DENSE_MISSING)
            if name == 'agent_num':  # stages without agent blocks do not use theirs
                want = [w if g is not None else None for g, w in zip(got, want)]
        else:
            got = _dense_get(data, key.split('.'))
        if got is _DENSE_MISSING and want is not None or not _dense_same(got, want):
            wrong.append(f'{key}: config {got if got is not _DENSE_MISSING else "<absent>"!r}, official {want!r}')
    assert not wrong, f'{path}:\n  ' + '\n  '.join(wrong)


def test_dense_table_catches_a_changed_value():
    # the comparison is not vacuous: a config changed in one value no longer matches its entry
    path = 'configs/mmseg/upernet_agent-swin-b_160k_ade20k-512x512.py'
    data = _dense_plain(_dense_load(path).to_dict())
    want = _dense_table()[path]['official']['model.backbone.drop_path_rate']
    assert _dense_same(_dense_get(data, ['model', 'backbone', 'drop_path_rate']), want)
    data['model']['backbone']['drop_path_rate'] = 0.3
    assert not _dense_same(_dense_get(data, ['model', 'backbone', 'drop_path_rate']), want)
    assert _dense_get(data, 'optim_wrapper.paramwise_cfg.custom_keys.norm.decay_mult'.split('.')) == 0.0
    assert _dense_get(data, 'train_dataloader.dataset.pipeline.*.type'.split('.'))[0] == 'LoadImageFromFile'
    assert _dense_get(data, ['optim_wrapper', 'no_such_key']) is _DENSE_MISSING
    assert _dense_same(_DENSE_MISSING, None) and not _dense_same(0.0, None)


def _dense_lr_curve(cfg, iters: int) -> list:
    """The learning rate of the first ``iters`` iterations under the config's param_scheduler, stepped as mmengine's
    ParamSchedulerHook does: iteration-based schedulers after every iteration, epoch-based ones only at epoch ends
    (none within ``iters``)."""
    import torch
    from mmengine.registry import PARAM_SCHEDULERS
    import mmengine.optim  # noqa: F401  (registers the schedulers)
    base = cfg.optim_wrapper.optimizer.lr
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    schedulers = [PARAM_SCHEDULERS.build(dict(s, optimizer=opt)) for s in cfg.param_scheduler]
    lrs = []
    for _ in range(iters):
        lrs.append(opt.param_groups[0]['lr'])
        opt.step()
        for s in schedulers:
            if not s.by_epoch:
                s.step()
    return lrs


# mmcv's LrUpdaterHooks as the official mmdet 2.x / mmseg 0.x runs computed them, within the first epoch (mmdet) or
# over the first iterations (mmseg): (config, base schedule, power, max_iters, warmup_iters, warmup_ratio)
_DENSE_MMCV_SCHEDULES = [
    ('configs/mmdet/mask-rcnn_agent-pvt-t_fpn_1x_coco.py', 'step', 0, 0, 500, 0.001),
    ('configs/mmdet/retinanet_agent-pvt-s_fpn_1x_coco.py', 'step', 0, 0, 500, 0.001),
    ('configs/mmdet/mask-rcnn_agent-swin-t_fpn_1x_coco.py', 'step', 0, 0, 500, 0.001),
    ('configs/mmdet/mask-rcnn_agent-swin-s_fpn_3x_coco.py', 'step', 0, 0, 500, 0.001),
    ('configs/mmdet/cascade-mask-rcnn_agent-swin-t_fpn_1x_coco.py', 'step', 0, 0, 500, 0.001),
    ('configs/mmdet/cascade-mask-rcnn_agent-swin-b_fpn_3x_coco.py', 'step', 0, 0, 500, 0.001),
    ('configs/mmseg/upernet_agent-swin-t_160k_ade20k-512x512.py', 'poly', 1.0, 160000, 1500, 1e-6),
    ('configs/mmseg/segformer_tap-fan-b-hybrid_160k_cityscapes-1024x1024.py', 'poly', 1.0, 160000, 1500, 1e-6),
    ('configs/mmseg/fpn_agent-pvt-t_40k_ade20k-512x512.py', 'poly', 0.9, 40000, 0, 0.0),
]


@_dense_pytest.mark.parametrize('path,policy,power,max_iters,warmup_iters,ratio', _DENSE_MMCV_SCHEDULES,
                                ids=[c[0].split('/')[-1] for c in _DENSE_MMCV_SCHEDULES])
def test_dense_lr_schedule_equals_mmcv_lr_updater(path, policy, power, max_iters, warmup_iters, ratio):
    # mmcv (LrUpdaterHook.before_train_iter, by_epoch=False warmup):
    #   poly:   regular(i) = base * (1 - i / max_iters) ** power      (min_lr 0)
    #   step:   regular(i) = base                                     (first epoch, before the first milestone)
    #   linear warmup, i < warmup_iters: regular(i) * (1 - (1 - i / warmup_iters) * (1 - warmup_ratio))
    cfg = _dense_load(path)
    base = cfg.optim_wrapper.optimizer.lr
    if policy == 'poly':
        assert cfg.train_cfg.max_iters == max_iters
    n = max(warmup_iters, 100) + 100
    got = _dense_lr_curve(cfg, n)
    for i in range(n):
        want = base * (1 - i / max_iters) ** power if policy == 'poly' else base
        if i < warmup_iters:
            want *= 1 - (1 - i / warmup_iters) * (1 - ratio)
        assert got[i] == _dense_pytest.approx(want, rel=1e-9), (i, got[i], want)
