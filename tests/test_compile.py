"""torch.compile: every family's tiny configuration (same code path as its registered models) compiles with
fullgraph=True, matches eager in eval, trains a step with eager's gradients; dynamic sizes; train.py --torchcompile.

Compiling with inductor costs ~20-60 s per tiny model on two cores, so the per-family checks use the ``aot_eager``
backend: it runs the same Dynamo capture (graph breaks, guards, fullgraph) and AOTAutograd (functionalisation of the
in-place ops, the traced backward) as inductor, without the C++ code generation. One test runs inductor itself.
``python tools/export.py --check-all --checks compile`` checks every registered model.
"""
import csv
from pathlib import Path

import pytest
import torch

from vitzoo.data.shapes import write_image_folder
from vitzoo.train_utils import TrainWrapper, method_of

from conftest import load_tool

export = load_tool('export')
FAMILIES = {f.name: f for f in export.FAMILIES}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tiny(fam, **kw):
    torch.manual_seed(0)
    return export.build_model(fam.tiny_model, model_kwargs=dict(fam.tiny_kwargs, num_classes=10, **kw))


def _grad_error(model, x, ref_grads):
    """Largest |grad - ref| of any parameter, relative to that parameter's largest reference gradient."""
    model.zero_grad(set_to_none=True)
    export.train_loss(model(x)).backward()
    err = 0.0
    for p, g in zip(model.parameters(), ref_grads):
        if g is not None:
            err = max(err, ((p.grad.double() - g).abs().max() / g.abs().max().clamp_min(1e-30)).item())
    model.zero_grad(set_to_none=True)
    return err


@pytest.mark.parametrize('family', list(FAMILIES))
def test_compile_fullgraph_eval_and_train_step(family):
    """Eval outputs within 1e-5 of eager; one train step (the method's forward, as tools/train.py runs it) gives a
    finite loss and gradients as close to float64 as eager fp32's (within 10x: both only reorder fp32 sums)."""
    fam = FAMILIES[family]
    assert fam.fullgraph  # every family promises no graph breaks
    model = _tiny(fam)
    net = TrainWrapper(model, method_of(fam.tiny_model))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    res = export.check_compile(net, x, fullgraph=True, backend='aot_eager', train=True)
    assert res['eval_max_abs_diff'] <= 1e-5, res
    assert res['loss_finite'] and res['loss_abs_diff'] <= 1e-5 * max(1.0, abs(res['loss'])), res
    # float64 reference gradients: the scale of fp32 rounding in this model's backward
    ref64 = TrainWrapper(_tiny(fam).double().train(), net.method)
    ref64.zero_grad(set_to_none=True)
    export.train_loss(ref64(x.double())).backward()
    ref_grads = [p.grad for p in ref64.parameters()]
    net.train()
    eager_err = _grad_error(net, x, ref_grads)
    compiled = torch.compile(net, backend='aot_eager', fullgraph=True)
    compiled_err = _grad_error(compiled, x, ref_grads)
    assert compiled_err <= 10 * eager_err + 1e-6, (compiled_err, eager_err)


def test_inductor_eval_and_train_parity():
    """The default backend (C++ code generation on CPU) on Agent-DeiT: eval within 1e-5, training step gradients.

    One agent block built for its 64 px input (4x4 patch grid, 2x2 agents: no run-time resizing of the position
    table or the agent biases): every op of an agent block is lowered, fused and compiled, in as few kernels as the
    model allows. Inductor's time is per graph and per kernel (lowering, one C++ compile each), nearly independent of
    width and depth; its cache (on by default) makes a rerun take seconds."""
    model = _tiny(FAMILIES['agent_deit'], embed_dim=32, depth=1, agent_num=4, img_size=64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    res = export.check_compile(model, x, fullgraph=True, backend='inductor', train=True)
    assert res['eval_max_abs_diff'] <= 1e-5, res
    assert res['loss_finite'] and res['grad_rel_diff'] <= 1e-3, res


@pytest.mark.parametrize('family', [f.name for f in export.FAMILIES if f.dynamic_hw])
def test_dynamic_two_sizes_one_graph(family):
    """dynamic=True: a second batch size and resolution run on the first graph (a recompile is an error).

    Both square: Dynamo's duck sizing gives equal example sizes one symbol, so the first non-square input recompiles
    once (torch's behaviour, not the model's; the second graph then serves every size)."""
    fam = FAMILIES[family]
    model = _tiny(fam)
    compiled = torch.compile(model, backend='eager', fullgraph=True, dynamic=True)
    x1 = torch.randn(2, 3, 224, 224)
    x2 = torch.randn(3, 3, 160, 160)
    with torch.no_grad():
        y1 = compiled(x1)
        with torch._dynamo.config.patch(error_on_recompile=True):
            y2 = compiled(x2)
        torch.testing.assert_close(y1, model(x1), rtol=0, atol=1e-5)
        torch.testing.assert_close(y2, model(x2), rtol=0, atol=1e-5)


def test_dynamic_window_families_recompile_per_geometry():
    """Agent-Swin: a map size with another window geometry recompiles (documented) and stays correct."""
    model = _tiny(FAMILIES['agent_swin'])
    compiled = torch.compile(model, backend='eager', fullgraph=True, dynamic=True)
    with torch.no_grad():
        for size in (224, 256):
            x = torch.randn(2, 3, size, size)
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-5)


def test_train_py_torchcompile_matches_eager(tmp_path):
    """tools/train.py --torchcompile trains the same run as eager (same seed): losses and weights agree."""
    train = load_tool('train')
    data = write_image_folder(tmp_path / 'shapes', num_train=16, num_val=8, num_classes=4, img_size=32, seed=0,
                              progress=False)
    base = ['--data-dir', str(data), '--model', 'agent_deit_tiny', '--img-size', '32', '--model-kwargs',
            'patch_size=8', 'embed_dim=32', 'depth=2', 'num_heads=2', 'agent_num=4', '--threads', '1', '-j', '0',
            '-b', '8', '--lr', '1e-3', '--warmup-epochs', '0', '--crop-pct', '1.0', '--epochs', '1',
            '--output', str(tmp_path)]
    outs = {}
    for name, extra in (('eager', []), ('compiled', ['--torchcompile', 'aot_eager'])):
        out = train.main([*base, '--experiment', name, *extra])
        with open(Path(out['output_dir']) / 'summary.csv') as f:
            row = list(csv.DictReader(f))[-1]
        ckpt = torch.load(Path(out['output_dir']) / 'last.pth', map_location='cpu', weights_only=True)
        outs[name] = (row, ckpt['model'])
    (row_e, w_e), (row_c, w_c) = outs['eager'], outs['compiled']
    assert abs(float(row_e['train_loss']) - float(row_c['train_loss'])) <= 1e-5
    assert abs(float(row_e['eval_loss']) - float(row_c['eval_loss'])) <= 1e-5
    assert w_e.keys() == w_c.keys()  # the checkpoint holds the bare model (no _orig_mod. prefixes)
    assert max((w_e[k].float() - w_c[k].float()).abs().max().item() for k in w_e) <= 1e-5
