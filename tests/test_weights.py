"""Weights manifest, verified code-free loading, conversion to timm's hub layout (tools/convert_weights.py).

Official-format files are written from the parity references in tests/data (official key names, reduced configs).
The ``verified_builders`` fixture gives the Agent families the ``_create_*`` -> ``vitzoo.weights.build_model_with_cfg``
wiring described in weights/README.md (a no-op once the model files import it themselves).
"""
import argparse
import hashlib
import importlib.util
import json
import re
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch

import vitzoo.weights as vw
from vitzoo.data.shapes import write_image_folder
from vitzoo.models import CheckpointError, agent_cswin, agent_deit, agent_swin
from vitzoo.utils import list_models

from conftest import load_parity, parity_input

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / 'weights' / 'manifest.json'
SHA = re.compile(r'^[0-9a-f]{64}$')

# parity reference -> (model, vitzoo kwargs of the reduced official config)
REFS = {
    'agent_deit_tiny-like.pt': ('agent_deit_tiny', lambda k: dict(
        embed_dim=k['embed_dim'], depth=k['depth'], num_heads=k['num_heads'], agent_num=k['agent_num'],
        agent_layer=k['agent_layer'])),
    'agent_swin-like.pt': ('agent_swin_tiny', lambda k: dict(
        embed_dim=k['embed_dim'], depths=k['depths'], num_heads=k['num_heads'], window_size=k['window_size'],
        mlp_ratio=k['mlp_ratio'], agent_num=k['agent_num'], attn_type=k['attn_type'])),
    'agent_cswin-like.pt': ('agent_cswin_tiny', lambda k: dict(
        embed_dim=k['embed_dim'], depth=k['depth'], split_size=k['split_size'], num_heads=k['num_heads'],
        agent_num=k['agent_num'], attn_type=k['attn_type'], la_split_size=k['la_split_size'])),
}
DEIT = 'agent_deit_tiny-like.pt'


def _tool():
    spec = importlib.util.spec_from_file_location('convert_weights', ROOT / 'tools' / 'convert_weights.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONVERT = _tool()


def _ref(name):
    ref = load_parity(name)
    model, kwargs = REFS[name]
    return ref, model, dict(kwargs(ref['official_kwargs']), num_classes=ref['official_kwargs']['num_classes'])


def _official_file(tmp_path, ref):
    path = tmp_path / 'deit.pth'
    torch.save({'model': ref['state_dict']}, path)
    return path


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _forward(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _create(model, kwargs, **overlay):
    return timm.create_model(model, pretrained=True, pretrained_cfg_overlay=dict(
        overlay, num_classes=kwargs['num_classes']), **kwargs).eval()


@pytest.fixture
def verified_builders(monkeypatch):
    for module in (agent_deit, agent_swin, agent_cswin):
        monkeypatch.setattr(module, 'build_model_with_cfg', vw.build_model_with_cfg)


@pytest.fixture
def manifest_with(tmp_path, monkeypatch):
    """Point vitzoo at a copy of the manifest whose entries are updated with the given fields."""
    def write(**entries):
        data = json.loads(MANIFEST.read_text())
        for key, fields in entries.items():
            data['models'][key] = dict(data['models'].get(key, {'family': 'agent_attention'}), **fields)
        path = tmp_path / 'manifest.json'
        path.write_text(json.dumps(data))
        monkeypatch.setenv(vw.MANIFEST_ENV, str(path))
        return path
    return write


@pytest.fixture
def no_unpickling(monkeypatch):
    """Record every deserialisation done by vitzoo.weights."""
    calls = []
    real = vw.safe_load

    def spy(path, *args, **kwargs):
        calls.append(Path(path).name)
        return real(path, *args, **kwargs)
    # vitzoo.weights re-exports the builder's functions: patch safe_load where load_checkpoint looks it up
    monkeypatch.setattr(sys.modules[vw.load_checkpoint.__module__], 'safe_load', spy)
    return calls


# ---- manifest ---------------------------------------------------------------------------------------------------


def test_manifest_covers_every_registered_model():
    """Each registered model has a manifest entry or is listed (with a reason) as having no official weights."""
    data = json.loads(MANIFEST.read_text())
    with_weights = {key.split('.')[0] for key in data['models']}
    without = set(data['no_official_weights'])
    registered = set(list_models())
    assert not with_weights & without
    missing = sorted(registered - with_weights - without)
    assert not missing, f'add these models to weights/manifest.json (models or no_official_weights): {missing}'
    assert not (with_weights | without) - registered, 'the manifest names models that are not registered'
    for key in data['models']:
        assert timm.models.get_pretrained_cfg(key) is not None, f'{key}: no such pretrained tag in default_cfgs'
    for name, item in data['no_official_weights'].items():
        assert item['reason'] and item['family'] in data['families'], name


def test_manifest_entries_are_well_formed():
    data = json.loads(MANIFEST.read_text())
    for family, info in data['families'].items():
        assert info['license'] and info['code'].startswith('https://github.com/'), family
    assert len(data['models']) >= 20
    for key, e in data['models'].items():
        assert e['family'] in data['families'], key
        assert e['sha256'] == '' or SHA.match(e['sha256']), key
        assert e['converted']['sha256'] == '' or SHA.match(e['converted']['sha256']), key
        assert e['format']['state_dict_key'] in ('model', 'state_dict') and isinstance(e['format']['use_ema'], bool)
        for url in e['urls']:
            # direct files only: folders and share pages belong in source_page
            assert url.startswith('https://') and 'drive.google.com' not in url, (key, url)
        if not e['urls']:
            assert e['source_page'].startswith('https://') and e['notes'], key
        metrics = {k: v for k, v in e['metrics'].items() if k != 'source'}
        assert metrics and all(isinstance(v, (int, float)) for v in metrics.values()), key
        assert e['metrics']['source'], key
    # spot checks against the official READMEs
    m = data['models']
    assert m['agent_deit_tiny.in1k']['urls'] == ['https://cloud.tsinghua.edu.cn/f/57e0904221824ee7b7af/?dl=1']
    assert m['agent_cswin_base_384.in1k']['metrics']['imagenet1k_top1'] == 85.8
    assert m['tap_fan_base_16_p4_hybrid.in1k']['metrics']['imagenet_c_mce'] == 43.7
    assert m['sat_deit_small.cub']['metrics']['cub_gt_known_loc'] == 98.45 and m['sat_deit_small.cub']['urls'] == []


@pytest.mark.parametrize('family', ['agent_deit', 'agent_swin', 'agent_cswin'])
def test_pretrained_cfgs_point_at_the_manifest(family):
    data = json.loads(MANIFEST.read_text())
    keys = [k for k in data['models'] if k.startswith(family + '_')]
    assert keys
    for key in keys:
        cfg = timm.models.get_pretrained_cfg(key)
        assert cfg.url == data['models'][key]['urls'][0], key
        assert cfg.license == data['families'][data['models'][key]['family']]['license'], key
        assert str(data['models'][key]['metrics']['imagenet1k_top1']) in cfg.description, key


# ---- conversion -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('ref_name', sorted(REFS))
def test_convert_then_load_offline_gives_identical_logits(ref_name, tmp_path, verified_builders):
    ref, model, kwargs = _ref(ref_name)
    official = tmp_path / 'official.pth'
    torch.save({'model': ref['state_dict'], 'epoch': 300, 'max_accuracy': 74.9}, official)
    out = tmp_path / 'export'
    arch_kwargs = {k: v for k, v in kwargs.items() if k != 'num_classes'}
    result = CONVERT.main([model, str(official), str(out), '--model-kwargs', json.dumps(arch_kwargs),
                           '--manifest', str(tmp_path / 'absent.json')])
    assert result['check']['logits_identical'] and not result['check']['tensors_differing']
    assert result['official_sha256'] == _sha(official)
    assert result['converted_sha256'] == _sha(out / 'model.safetensors')
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == model and config['num_classes'] == kwargs['num_classes']
    assert config['vitzoo']['weights_sha256'] == _sha(out / 'model.safetensors')
    assert config['vitzoo']['source_sha256'] == _sha(official)

    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    filtered = _create(model, kwargs, file=str(official))
    x = parity_input(ref)
    y = _forward(loaded, x)
    assert torch.equal(y, _forward(filtered, x))
    assert (y - ref['output']).abs().max().item() <= 1e-5


def test_update_manifest_records_digests_then_refuses_a_tampered_file(tmp_path, manifest_with, no_unpickling):
    ref, model, kwargs = _ref(DEIT)
    manifest = manifest_with()
    official = tmp_path / 'agent_deit_t.pth'
    torch.save({'model': ref['state_dict']}, official)
    arch_kwargs = json.dumps({k: v for k, v in kwargs.items() if k != 'num_classes'})
    result = CONVERT.main([model, str(official), str(tmp_path / 'out'), '--model-kwargs', arch_kwargs,
                           '--manifest', str(manifest), '--update-manifest', '--hf-hub-id', 'someone/agent_deit_t'])
    entry = json.loads(manifest.read_text())['models']['agent_deit_tiny.in1k']
    assert entry['sha256'] == _sha(official) and entry['filename'] == 'agent_deit_t.pth'
    assert entry['size'] == official.stat().st_size
    assert entry['converted']['sha256'] == result['converted_sha256'] == _sha(tmp_path / 'out' / 'model.safetensors')
    assert entry['converted']['hf_hub_id'] == 'someone/agent_deit_t'
    assert entry['urls'] == json.loads(MANIFEST.read_text())['models']['agent_deit_tiny.in1k']['urls']  # kept

    # one extra byte: torch would still read the zip, the digest does not match
    with open(official, 'ab') as f:
        f.write(b'\0')
    no_unpickling.clear()
    with pytest.raises(vw.ChecksumError, match='sha256 mismatch.*Nothing was loaded'):
        CONVERT.main([model, str(official), str(tmp_path / 'out2'), '--model-kwargs', arch_kwargs,
                      '--manifest', str(manifest)])
    with pytest.raises(vw.ChecksumError):
        vw.load_checkpoint(official, model, strict=True)
    assert no_unpickling == [] and not (tmp_path / 'out2').exists()


def test_sha256_mismatch_is_refused_before_loading(tmp_path, manifest_with, verified_builders, no_unpickling):
    ref, model, kwargs = _ref(DEIT)
    official = tmp_path / 'agent_deit_t.pth'
    torch.save({'model': ref['state_dict']}, official)
    manifest_with(**{'agent_deit_tiny.in1k': dict(filename='agent_deit_t.pth', sha256='0' * 64)})
    with pytest.raises(vw.ChecksumError, match=f"the file has {_sha(official)}, expected 0{{64}}"):
        _create(model, kwargs, file=str(official))
    with pytest.raises(vw.ChecksumError):
        vw.load_checkpoint(official, 'agent_deit_tiny')
    with pytest.raises(vw.ChecksumError):
        vw.load_checkpoint(tmp_path / 'agent_deit_t.pth', sha256='f' * 64)
    assert no_unpickling == []

    manifest_with(**{'agent_deit_tiny.in1k': dict(filename='agent_deit_t.pth', sha256=_sha(official))})
    y = _forward(_create(model, kwargs, file=str(official)), parity_input(ref))
    assert (y - ref['output']).abs().max().item() <= 1e-5
    assert no_unpickling == ['agent_deit_t.pth']


def test_url_download_goes_through_timm_cache_and_is_verified(tmp_path, manifest_with, verified_builders):
    ref, model, kwargs = _ref(DEIT)
    served = tmp_path / 'served'
    served.mkdir()
    torch.save({'model': ref['state_dict']}, served / 'agent_deit_t.pth')
    url = (served / 'agent_deit_t.pth').as_uri()
    cache = tmp_path / 'cache'

    manifest_with(**{'agent_deit_tiny.in1k': dict(urls=[url], filename=None, sha256='1' * 64)})
    with pytest.raises(vw.ChecksumError, match='download was deleted'):
        timm.create_model(model, pretrained=True, pretrained_cfg_overlay=dict(url=url, num_classes=10),
                          cache_dir=cache, **kwargs)
    assert not (cache / 'agent_deit_t.pth').exists()

    manifest_with(**{'agent_deit_tiny.in1k': dict(urls=[url], filename=None, sha256=_sha(served / 'agent_deit_t.pth'))})
    m = timm.create_model(model, pretrained=True, pretrained_cfg_overlay=dict(url=url, num_classes=10),
                          cache_dir=cache, **kwargs)
    assert (cache / 'agent_deit_t.pth').is_file() and m.pretrained_cfg['file'] == str(cache / 'agent_deit_t.pth')
    assert 'state_dict' not in m.pretrained_cfg  # the tensors are not kept twice
    assert (_forward(m, parity_input(ref)) - ref['output']).abs().max().item() <= 1e-5


def test_tampered_export_folder_is_refused(tmp_path, verified_builders):
    ref, model, kwargs = _ref(DEIT)
    official = tmp_path / 'official.pth'
    torch.save(ref['state_dict'], official)
    out = tmp_path / 'export'
    arch_kwargs = json.dumps({k: v for k, v in kwargs.items() if k != 'num_classes'})
    CONVERT.main([model, str(official), str(out), '--model-kwargs', arch_kwargs,
                  '--manifest', str(tmp_path / 'absent.json')])
    weights_file = out / 'model.safetensors'
    data = bytearray(weights_file.read_bytes())
    data[-1] ^= 1  # flip one bit of the last tensor
    weights_file.write_bytes(bytes(data))
    with pytest.raises(vw.ChecksumError, match='model.safetensors'):
        timm.create_model(f'local-dir:{out}', pretrained=True)


# ---- code-free loading ------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this object would create a file (stands for any code a malicious pickle runs)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


@pytest.mark.parametrize('zip_format', [True, False])
def test_pickle_that_runs_code_is_refused(zip_format, tmp_path, verified_builders):
    ref, model, kwargs = _ref(DEIT)
    marker = tmp_path / 'code_ran'
    evil = tmp_path / 'evil.pth'
    torch.save({'model': ref['state_dict'], 'extra': _Payload(marker)}, evil,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(vw.UnsafeCheckpointError, match=r'unpickling it would run code \(needs [\w.]*open\).*'
                                                       r'weights_only=True'):
        vw.load_checkpoint(evil)
    with pytest.raises(vw.UnsafeCheckpointError):
        _create(model, kwargs, file=str(evil))
    with pytest.raises(vw.UnsafeCheckpointError):
        CONVERT.main([model, str(evil), str(tmp_path / 'out'), '--manifest', str(tmp_path / 'absent.json')])
    assert not marker.exists()


class _Note:
    """Plain metadata object (no custom reduce): outside the weights-only allowlist unless a caller adds it."""

    def __init__(self, text):
        self.text = text


def test_safe_load_extra_globals_and_trusted_fallback(tmp_path):
    path = tmp_path / 'runner.pth'
    torch.save({'state_dict': {'w': torch.ones(2)}, 'meta': _Note('hi')}, path)
    with pytest.raises(vw.UnsafeCheckpointError, match=r'_Note'):
        vw.safe_load(path)
    for ckpt in (vw.safe_load(path, allow_globals=[_Note]), vw.safe_load(path, trusted=True)):
        assert ckpt['meta'].text == 'hi' and torch.equal(ckpt['state_dict']['w'], torch.ones(2))


def _fake_yacs(monkeypatch):
    """A module named yacs.config with a CfgNode like yacs' (a dict subclass with attributes), to pickle with."""
    config = types.ModuleType('yacs.config')

    class CfgNode(dict):
        def __init__(self, init=None):
            super().__init__(init or {})
            self.__dict__['__immutable__'] = False

    CfgNode.__module__, CfgNode.__qualname__ = 'yacs.config', 'CfgNode'
    config.CfgNode = CfgNode
    package = types.ModuleType('yacs')
    package.config = config
    monkeypatch.setitem(sys.modules, 'yacs', package)
    monkeypatch.setitem(sys.modules, 'yacs.config', config)
    return CfgNode


def test_official_training_metadata_is_read_as_inert_data(tmp_path, monkeypatch, verified_builders):
    """Agent-Attention checkpoints pickle a yacs CfgNode, timm / DeiT trainers an argparse.Namespace."""
    ref, model, kwargs = _ref(DEIT)
    CfgNode = _fake_yacs(monkeypatch)
    path = tmp_path / 'official.pth'
    torch.save({'model': ref['state_dict'], 'epoch': 299, 'args': argparse.Namespace(lr=5e-4, model='x'),
                'config': CfgNode({'MODEL': CfgNode({'TYPE': 'agent_deit', 'NUM': [49, 49]}), 'LR': 1e-3})}, path)
    monkeypatch.delitem(sys.modules, 'yacs')
    monkeypatch.delitem(sys.modules, 'yacs.config')

    raw = vw.safe_load(path)
    assert type(raw['config']) is OrderedDict and raw['config']['MODEL']['NUM'] == [49, 49]
    assert raw['config'].__dict__ == {'__immutable__': False} and raw['args'].lr == 5e-4
    y = _forward(_create(model, kwargs, file=str(path)), parity_input(ref))
    assert (y - ref['output']).abs().max().item() <= 1e-5
    assert 'yacs' not in sys.modules  # read by name, never imported


def test_ema_choice_follows_the_manifest(tmp_path, manifest_with, verified_builders):
    """Non-EMA weights unless the manifest (what the official evaluation used) or the caller asks for EMA."""
    ref, model, kwargs = _ref(DEIT)
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in ref['state_dict'].items()}
    path = tmp_path / 'trainer.pth.tar'
    torch.save({'state_dict': ref['state_dict'], 'state_dict_ema': ema, 'args': argparse.Namespace()}, path)
    x = parity_input(ref)
    manifest_with(**{'agent_deit_tiny.in1k': dict(format=dict(state_dict_key='state_dict', use_ema=False))})
    y_plain = _forward(_create(model, kwargs, file=str(path)), x)
    assert (y_plain - ref['output']).abs().max().item() <= 1e-5
    y_ema = _forward(timm.create_model(model, pretrained=True, pretrained_use_ema=True, pretrained_cfg_overlay=dict(
        file=str(path), num_classes=10), **kwargs), x)
    y_ref_ema = _forward(_create(model, kwargs, state_dict=ema), x)
    assert torch.equal(y_ema, y_ref_ema) and not torch.allclose(y_ema, y_plain)
    manifest_with(**{'agent_deit_tiny.in1k': dict(format=dict(state_dict_key='state_dict', use_ema=True))})
    assert torch.equal(_forward(_create(model, kwargs, file=str(path)), x), y_ref_ema)
    # an export holds the selected weights only: the manifest's EMA choice does not apply to it
    from safetensors.torch import save_file
    save_file(dict(ref['state_dict']), str(tmp_path / 'model.safetensors'))
    assert torch.equal(_forward(_create(model, kwargs, file=str(tmp_path / 'model.safetensors')), x), y_plain)
    with pytest.raises(vw.WeightsError, match='EMA weights requested'):
        vw.load_checkpoint(tmp_path / 'model.safetensors', use_ema=True)


def test_wrong_architecture_names_the_mismatched_keys(tmp_path, verified_builders):
    ref, model, kwargs = _ref(DEIT)
    swin = load_parity('agent_swin-like.pt')
    path = tmp_path / 'swin.pth'
    torch.save({'model': swin['state_dict']}, path)
    with pytest.raises(CheckpointError, match=r"checkpoint does not fit .*missing key 'cls_token'"):
        _create(model, kwargs, file=str(path))
    with pytest.raises(CheckpointError, match=r"missing key 'blocks\.2\.norm1\.weight' \(expected shape \(64,\)\)"):
        _create(model, dict(kwargs, depth=3), file=str(_official_file(tmp_path, ref)))
    arch_kwargs = json.dumps({k: v for k, v in kwargs.items() if k != 'num_classes'})
    with pytest.raises(CheckpointError, match="missing key 'cls_token'"):
        CONVERT.main([model, str(path), str(tmp_path / 'out'), '--model-kwargs', arch_kwargs,
                      '--manifest', str(tmp_path / 'absent.json')])


def test_models_without_direct_weights_explain_why():
    with pytest.raises(vw.WeightsError, match='sparsifiner_deit_small has no official weights: No trained'):
        vw.resolve_pretrained('sparsifiner_deit_small', {})
    with pytest.raises(vw.WeightsError, match=r'sat_deit_small\.cub.*drive\.google\.com/drive/folders'):
        vw.resolve_pretrained('sat_deit_small', dict(pretrained_cfg='cub'))
    # an explicit file is always accepted
    kwargs = vw.resolve_pretrained('sparsifiner_deit_small', dict(pretrained_cfg_overlay=dict(state_dict={})))
    assert kwargs['pretrained_cfg_overlay'] == dict(state_dict={})


# ---- the tool's interface ---------------------------------------------------------------------------------------


def test_tool_help_explains_usage(capsys):
    with pytest.raises(SystemExit) as e:
        CONVERT.main(['--help'])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ('MODEL', 'OFFICIAL_FILE', 'OUT_DIR', '--model-kwargs', '--update-manifest', 'local-dir',
                 'model.safetensors', '--eval-dir'):
        assert word in text


def test_tool_evaluates_an_image_folder(tmp_path):
    ref, model, kwargs = _ref(DEIT)
    official = _official_file(tmp_path, ref)
    data = write_image_folder(tmp_path / 'shapes', num_train=10, num_val=10, num_classes=10, img_size=32,
                              progress=False)
    arch_kwargs = json.dumps({k: v for k, v in kwargs.items() if k != 'num_classes'})
    result = CONVERT.main([model, str(official), str(tmp_path / 'out'), '--model-kwargs', arch_kwargs,
                           '--manifest', str(tmp_path / 'absent.json'), '--eval-dir', str(data / 'val'),
                           '--eval-workers', '0', '--eval-batch-size', '4'])
    ev = result['eval']
    assert ev['images'] == 10 and ev['data_config']['input_size'] == [3, 224, 224]
    # the same numbers by hand: the model's eval transform, argmax against the folder's class index
    from timm.data import ImageDataset, create_transform, resolve_data_config
    m = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    ds = ImageDataset(str(data / 'val'), transform=create_transform(**resolve_data_config(model=m)))
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    logits = _forward(m, torch.stack(xs))
    top5 = logits.topk(5, dim=1).indices
    ys = torch.tensor(ys)
    assert ev['top1'] == pytest.approx(100.0 * (top5[:, 0] == ys).float().mean().item())
    assert ev['top5'] == pytest.approx(100.0 * (top5 == ys[:, None]).any(1).float().mean().item())
