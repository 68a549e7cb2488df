"""tools/benchmark.py and tools/bench_agentsd.py run end to end (tiny sizes) and report what their tables claim."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import load_tool as _load


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_benchmark_models_and_agent_suites(tmp_path, capsys):
    bench = _load('benchmark')
    out = tmp_path / 'bench'
    assert bench.main(['--suite', 'models', 'agent', '--model', 'agent_deit_tiny', '--img-size', '32', '64',
                       '--agent-models', 'agent_deit_tiny', '-b', '1', '--repeats', '1', '--output', str(out)]) == 0
    res = json.loads((out / 'benchmark.json').read_text())
    models = res['models']
    assert [(r['model'], r['res']) for r in models] == [('agent_deit_tiny', 32), ('agent_deit_tiny', 64)]
    assert all(_positive(r['ms_per_img']) and _positive(r['gmacs']) for r in models)
    assert models[1]['gmacs'] > models[0]['gmacs'] and models[0]['params_m'] == models[1]['params_m']
    # agent suite without --official-dir: the module timings, the model vs timm DeiT-T at 224 / 896, the growth
    # exponent and the peak memory measured in a child process
    assert [r['tokens'] for r in res['agent_module']] == [56 * 56, 224 * 224]
    assert all(_positive(r['ours_ms']) and 'official_ms' not in r for r in res['agent_module'])
    rows = res['agent_models']
    assert [r['res'] for r in rows] == [224, 896]
    assert all(r['timm_model'] == 'deit_tiny_patch16_224' and _positive(r['speed_vs_timm']) for r in rows)
    assert 0.5 < rows[1]['ours_n_exp'] < 2.0
    assert _positive(res['agent_memory'][0]['ours_mib'])
    text = capsys.readouterr().out
    assert 'agent attention module' in text and 'peak memory' in text
    import csv
    with open(out / 'models.csv') as f:  # every table is also a CSV next to the JSON
        assert [r['res'] for r in csv.DictReader(f)] == ['32', '64']


def test_benchmark_compile_suite(tmp_path):
    """The compile suite compiles, checks the compiled logits against eager and times eval and training both ways."""
    bench = _load('benchmark')
    out = tmp_path / 'bench'
    assert bench.main(['--suite', 'compile', '--compile-models', 'agent_deit_tiny', '--compile-backend', 'aot_eager',
                       '-b', '1', '--repeats', '2', '--output', str(out)]) == 0
    (row,) = json.loads((out / 'benchmark.json').read_text())['compile']
    assert row['model'] == 'agent_deit_tiny' and row['backend'] == 'aot_eager'
    assert row['max_abs_diff'] < 1e-4
    for k in ('eval_ms', 'eval_compiled_ms', 'eval_speedup', 'train_ms', 'train_compiled_ms', 'train_speedup'):
        assert _positive(row[k]), k
    assert row['compile_eval_s'] >= 0 and row['compile_train_s'] >= 0


def test_benchmark_sparsifiner_suite(tmp_path):
    bench = _load('benchmark')
    out = tmp_path / 'bench'
    assert bench.main(['--suite', 'sparsifiner', '-b', '1', '--repeats', '2', '--output', str(out)]) == 0
    res = json.loads((out / 'benchmark.json').read_text())['sparsifiner']
    rows = {r['model']: r for r in res['models']}
    assert len(rows) == 6 and all(_positive(r['ms_per_img']) and _positive(r['latency_vs_deit_s'])
                                  for r in rows.values())
    # the analytic accounting: sparse attention cuts MHSA FLOPs, the dense run through vitzoo cuts nothing
    assert 0.3 < res['mhsa_flops_reduction_keep_0_25'] < 0.6
    assert rows['sparsifiner_deit_small attn_keep_rate=1 (dense)']['mhsa_reduction'] == 0
    assert res['original_style_max_abs_diff'] < 1e-4  # the emulated original computes the same logits


def test_bench_agentsd_tiny(capsys, tmp_path):
    tool = _load('bench_agentsd')
    js = tmp_path / 'agentsd.json'
    res = tool.main(['--latents', '16', '--unet-latent', '16', '--attn-repeats', '1', '--unet-repeats', '1',
                     '--json', str(js)])
    assert json.loads(js.read_text())['dtype'] == 'fp32'
    (row,) = res['attention']
    assert row['tokens'] == 256 and all(_positive(row[k]) for k in ('t_default', 't_agentsd', 't_tome', 'speedup'))
    unet = res['unet']
    assert unet['patched_blocks'] == 5  # SD-1.5: 2 down + 3 up transformer blocks at full latent resolution
    assert all(_positive(unet[k]) for k in ('t_default', 't_patched', 't_bound', 't_tome'))
    assert len(unet['share_saved_per_round']) == 1 and math.isfinite(unet['share_saved'])
    text = capsys.readouterr().out
    assert '(a) self-attention alone' in text and 'share of removable time saved' in text
    # half-precision attention runs through the same code (the GPU fp16 recipe; bf16 here)
    res = tool.main(['--latents', '16', '--skip-unet', '--attn-repeats', '1', '--dtype', 'bf16'])
    assert res['dtype'] == 'bf16' and _positive(res['attention'][0]['speedup'])


def test_benchmark_train_suite(tmp_path, capsys):
    bench = _load('benchmark')
    out = tmp_path / 'bench'
    assert bench.main(['--suite', 'train', '--train-models', 'agent_deit_tiny', '--train-img-size', '32', '448',
                       '--train-dtypes', 'fp32', 'bf16', '-b', '2', '--repeats', '2', '--threads', '1',
                       '--timer', 'cpu', '--no-train-memory', '--train-breakdown', '--output', str(out)]) == 0
    results = json.loads((out / 'benchmark.json').read_text())
    rows = results['train']
    # --train-breakdown: each candidate's profiled step split into GEMMs / shared kernels / casts / adds+sums / rest
    assert [(r['res'], r['dtype'], r['candidate']) for r in results['train_breakdown']] == [
        (s, d, k) for s in (32, 448) for d in ('fp32', 'bf16') for k in ('ours', 'timm')]
    for r in results['train_breakdown']:
        assert abs(sum(r[f'{c}_pct'] for c in bench.BREAKDOWN) - 100) < 0.5 and r['gemm_pct'] > 0
        assert r['kernels_pct'] > 0 and 'ceiling_vs_official' not in r  # LayerNorm, GELU, softmax: in every ViT
    casts = {(r['res'], r['candidate'], r['dtype']): r['casts_pct'] for r in results['train_breakdown']}
    for (res, cand, dtype), pct in casts.items():  # autocast's casts of weights, activations and gradients
        assert dtype == 'fp32' or pct > casts[res, cand, 'fp32'], (res, cand)
    # batch -b up to 224², shrunk with the token count above (448²: a quarter, at least 1)
    assert [(r['res'], r['batch'], r['dtype']) for r in rows] == [(32, 2, 'fp32'), (32, 2, 'bf16'), (448, 1, 'fp32'),
                                                                  (448, 1, 'bf16')]
    for r in rows:  # no --official-dir: ours vs timm's DeiT-T only
        assert r['timm_model'] == 'deit_tiny_patch16_224' and 'official_ms' not in r and 'ours_mib' not in r
        assert _positive(r['ours_ms']) and _positive(r['timm_ms']) and _positive(r['speed_vs_timm'])
    assert 'training step (fwd + loss + bwd)' in capsys.readouterr().out
    # peak memory of one step, each candidate in a fresh process; an optimizer step is named in the title; the
    # aten-GEMM ablation switches vitzoo's linear layers to F.linear
    from vitzoo.layers.linear import onednn_training_enabled, set_onednn_training
    assert onednn_training_enabled()
    try:
        assert bench.main(['--suite', 'train', '--train-models', 'sat_deit_tiny', '--train-img-size', '32',
                           '--train-dtypes', 'fp32', '-b', '2', '--repeats', '1', '--train-opt', 'adamw',
                           '--train-linear', 'aten', '--output', str(out)]) == 0
        assert not onednn_training_enabled()
    finally:
        set_onednn_training(True)
    results = json.loads((out / 'benchmark.json').read_text())
    (row,) = results['train']
    assert results['train_linear'] == 'aten'
    assert row['model'] == 'sat_deit_tiny' and _positive(row['ours_mib']) and _positive(row['timm_mib'])
    assert 'fwd + loss + bwd + adamw step' in capsys.readouterr().out


def test_benchmark_train_breakdown_classifies_ops():
    bench = _load('benchmark')
    a = torch.randn(768, 768)  # ms-sized ops: the rows are rounded to 0.1 ms / 0.1%

    def gemm_and_norm():  # what both sides must run
        return F.layer_norm(a @ a, (768,))

    def with_extras():  # the same plus layout copies, casts and adds
        y = F.layer_norm(a @ a, (768,))
        for _ in range(10):
            y = (y + a).t().contiguous().double().float() * 0.5
        return y

    gemm_and_norm(), with_extras()  # warm-up (the suite profiles warmed-up steps too)
    ours, official = bench._breakdown_rows(dict(model='m', res=1, dtype='fp32'),
                                           {'ours': gemm_and_norm, 'official': with_extras}, repeats=2)
    assert (ours['candidate'], official['candidate']) == ('ours', 'official')
    assert ours['gemm_pct'] > 50 and ours['kernels_pct'] > 0  # aten::mm and aten::native_layer_norm
    assert ours['casts_pct'] == 0 and ours['adds_sums_pct'] == 0
    for c in ('casts', 'adds_sums', 'other'):  # .double() / .float(); +; .t().contiguous() and * 0.5
        assert official[f'{c}_pct'] > 2, c
    # the floor drops only the rest; the ceiling is the official step over it
    assert ours['floor_ms'] == pytest.approx(ours['profiled_ms'] * (1 - ours['other_pct'] / 100), abs=0.2)  # rounding
    assert ours['ceiling_vs_official'] == pytest.approx(official['profiled_ms'] / ours['floor_ms'], rel=0.03)
    # at least the profiled ratio itself (the floor is part of ours' step), and only on ours' row
    assert ours['ceiling_vs_official'] >= 0.99 * official['profiled_ms'] / ours['profiled_ms'] > 1.2
    assert 'ceiling_vs_official' not in official
    # every class names real ops (a typo would silently move an op to 'other')
    for op in bench.GEMM_OPS | bench.KERNEL_OPS | bench.ADD_SUM_OPS | {bench.CAST_OP}:
        ns, name = op.split('::')
        assert hasattr(getattr(torch.ops, ns), name), op
    # a cast counts with its child copy (moved out of 'other'); the rest by self time
    assert bench.step_breakdown({'aten::bmm': [2.0, 1, 2.0], 'aten::gelu_backward': [1.0, 2, 1.0],
                                 'aten::_to_copy': [0.1, 3, 0.4], 'aten::copy_': [0.5, 9, 0.5],
                                 'aten::add_': [0.25, 1, 0.25]}) == \
        pytest.approx(dict(gemm=2.0, kernels=1.0, casts=0.4, adds_sums=0.25, other=0.2, total=3.85))


def test_benchmark_train_step_updates_the_model():
    bench = _load('benchmark')
    (model,) = bench._train_candidates('agent_deit_tiny', 32, None, only='ours').values()
    assert model.training
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    before = model.head.weight.detach().clone()
    loss = bench._train_step(model, x, y, 'fp32', 'sgd')()
    assert torch.isfinite(loss) and model.head.weight.grad is not None
    assert not torch.equal(before, model.head.weight)  # the optimizer stepped
    before = model.head.weight.detach().clone()
    bench._train_step(model, x, y, 'bf16', 'none')()
    assert torch.equal(before, model.head.weight) and model.head.weight.grad.dtype == torch.float32
    with pytest.raises(ValueError, match="no 'official' candidate"):
        bench._train_candidates('agent_deit_tiny', 32, None, only='official')


@pytest.mark.parametrize('name', ['tap_fan_tiny_12_p16_224', 'tap_rvt_tiny', 'sat_deit_tiny', 'sparsifiner_deit_tiny'])
def test_benchmark_train_step_uses_the_method_loss(name):
    # the method families' step is their training forward + method loss (as tools/train.py), not plain CE
    from vitzoo.losses.adl import attention_diversification_loss
    from vitzoo.losses.sat import SATLoss
    from vitzoo.losses.sparsifiner import distill_loss, teacher_outputs
    import timm
    bench = _load('benchmark')
    cands = bench._train_candidates(name, 64, None)
    model = cands['ours']
    with torch.no_grad():  # sharper attention, so that the ADL term is not zero (entries above 2/N)
        for n, p in model.named_parameters():
            if n.endswith(('attn.q.weight', 'attn.kv.weight', 'attn.qkv.weight')):
                p.mul_(8)
    torch.manual_seed(1)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    loss_fn = bench._train_loss_fn(name, 'ours', model, x)
    loss = loss_fn(model, x, y)
    if name.startswith('tap_'):
        logits, attn = model(x, return_attn=True)
        adl = attention_diversification_loss(attn, 2.0)
        assert adl > 1e-3
        expected = F.cross_entropy(logits, y) + adl
    elif name.startswith('sat_'):
        expected = SATLoss(area_thr=0.25)(model.forward_loc(x), y)
    else:  # phase 2: the predictor is frozen, the teacher is a DeiT-T run once
        assert not any(p.requires_grad for n, p in model.named_parameters() if 'predictor' in n)
        assert any(p.requires_grad for n, p in model.named_parameters() if 'predictor' not in n)
        torch.manual_seed(0)
        with torch.no_grad():
            t = teacher_outputs(timm.create_model('deit_tiny_patch16_224', img_size=64).eval(), x, return_attn=False)
        expected = distill_loss(model.forward_dict(x), t, y)[0]
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    assert abs(float(loss.detach()) - float(F.cross_entropy(model(x), y).detach())) > 1e-4  # not plain CE
    step = bench._train_step(model, x, y, 'fp32', 'none', loss_fn)
    torch.testing.assert_close(step(), loss.detach(), rtol=0, atol=1e-6)
    # timm's counterpart keeps the plain cross-entropy
    base = cands['timm']
    torch.testing.assert_close(bench._train_loss_fn(name, 'timm', base, x)(base, x, y), F.cross_entropy(base(x), y))


def test_benchmark_official_checkouts(tmp_path):
    bench = _load('benchmark')
    for kind, (marker, _) in bench.OFFICIAL_REPOS.items():
        (tmp_path / kind / marker).parent.mkdir(parents=True)
        (tmp_path / kind / marker).write_text('')
    found = bench.official_checkouts([str(tmp_path / k) for k in ('tapadl', 'agent', 'sat', 'sparsifiner')])
    assert found == {k: tmp_path / k for k in bench.OFFICIAL_REPOS}
    assert bench.official_checkouts(None) == {}
    with pytest.raises(FileNotFoundError, match=r'--official-dir .*elsewhere: not a checkout .*Model/SAT.py'):
        bench.official_checkouts([str(tmp_path / 'elsewhere')])


def test_benchmark_official_import_names_a_missing_dependency(tmp_path):
    bench = _load('benchmark')
    (tmp_path / 'Model').mkdir()
    (tmp_path / 'Model' / '__init__.py').write_text('')
    (tmp_path / 'Model' / 'SAT.py').write_text('import vitzoo_no_such_dependency\n')
    with pytest.raises(ModuleNotFoundError, match=r"imports 'vitzoo_no_such_dependency', which is not installed"):
        bench._import_checkout_module(tmp_path, 'Model.SAT')
    import sys
    assert 'Model' not in sys.modules and str(tmp_path) not in sys.path  # the checkout's names are forgotten
    assert not any(isinstance(f, bench._CheckoutFinder) for f in sys.meta_path)
