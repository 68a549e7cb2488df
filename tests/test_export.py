"""tools/export.py: ONNX (onnxruntime) and torch.export parity with eager for one tiny configuration per family,
dynamic batch / height / width, the torch.export save-load round trip, the command line, and clear errors."""
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('_vitzoo_tool_export', ROOT / 'tools' / 'export.py')
export = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export)
FAMILIES = {f.name: f for f in export.FAMILIES}


def _tiny(fam):
    torch.manual_seed(0)
    return export.build_model(fam.tiny_model, model_kwargs=dict(fam.tiny_kwargs, num_classes=10))


@pytest.mark.parametrize('family', list(FAMILIES))
def test_onnx_runtime_parity(family, tmp_path):
    """ONNX in onnxruntime within 1e-4 of eager at the default resolution; the batch is dynamic, and so are height /
    width where the family supports them (checked at a second, non-square size)."""
    fam = FAMILIES[family]
    model = _tiny(fam)
    path = tmp_path / 'm.onnx'
    res = export.export_and_validate(model, fam.tiny_model, 'onnx', str(path), dynamic=fam.dynamic_hw, repeats=1)
    assert res['max_abs_diff_per_input'][0] <= 1e-4, res
    assert res['max_abs_diff'] <= 1e-4, res
    b2, _, h2, w2 = res['checked'][1]
    assert b2 == 3 and ((h2, w2) != (224, 224)) == fam.dynamic_hw
    graph = onnx.load(str(path))
    assert max(o.version for o in graph.opset_import if o.domain in ('', 'ai.onnx')) == 18
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    symbolic = [bool(d.dim_param) for d in dims]
    assert symbolic == [True, False, fam.dynamic_hw, fam.dynamic_hw]
    assert res['file_mb'] > 0 and res['eager_ms'] > 0 and res['exported_ms'] > 0


@pytest.mark.parametrize('family,dynamic', [('sparsifiner_deit', True), ('agent_swin', False)])
def test_torch_export_round_trip(family, dynamic, tmp_path):
    """torch.export -> save -> load runs like eager (and, dynamic, at another batch size and resolution)."""
    fam = FAMILIES[family]
    model = _tiny(fam)
    path = tmp_path / 'm.pt2'
    res = export.export_and_validate(model, fam.tiny_model, 'torch-export', str(path), dynamic=dynamic, repeats=1)
    assert res['max_abs_diff'] <= 1e-5, res
    loaded = torch.export.load(str(path)).module()
    x = torch.randn(2, 3, 192, 256) if dynamic else torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-5)


def test_cli_writes_table_and_json(tmp_path):
    out, js = tmp_path / 'sat.pt2', tmp_path / 'sat.json'
    cmd = [sys.executable, str(ROOT / 'tools' / 'export.py'), 'sat_deit_tiny', '--format', 'torch-export', '--dynamic',
           '--model-kwargs', 'embed_dim=48', 'depth=3', 'num_heads=3', '--output', str(out), '--json', str(js),
           '--repeats', '1', '--threads', '1']
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert '| sat_deit_tiny' in res.stdout and 'max_abs_diff' in res.stdout
    row = json.loads(js.read_text())[0]
    assert row['format'] == 'torch-export' and row['dynamic'] and out.is_file()
    assert row['max_abs_diff'] <= 1e-5 and row['checked'][1][2:] != [224, 224]


@pytest.mark.parametrize('argv,match', [
    (['agent_swin_tiny', '--dynamic'], r'--dynamic \(any height/width\) is not supported for agent_swin: .*shifted'),
    (['agent_cswin_tiny', '--dynamic', '--format', 'torch-export'], 'not supported for agent_cswin'),
    (['agent_deit_tiny', '--format', 'tflite'], "--format 'tflite' is not supported: choose one of onnx, torch-export"),
    (['resnet18'], "'resnet18' is not a vitzoo model"),
    (['agent_deit_tiny', '--checkpoint', 'missing.pth'], "--checkpoint 'missing.pth' does not exist"),
    ([], 'give a MODEL name, or --check-all'),
])
def test_clear_errors(argv, match, capsys):
    assert export.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ')
    assert re.search(match, err), err


def test_family_table_covers_every_registered_model():
    from vitzoo.utils import list_models
    names = list_models()
    assert len(names) >= 55
    assert {export.family_of(n).name for n in names} == set(FAMILIES)
