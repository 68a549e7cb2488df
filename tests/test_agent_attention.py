"""The one agent-attention core: fused == explicit, any grid, bias cache, errors."""
import pytest
import torch

from vitzoo.layers.agent_attention import AgentAttention, agent_attention, resize_bias_1d, split_qkv


def _randomize(m: AgentAttention, seed: int = 0) -> AgentAttention:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


@pytest.mark.parametrize('layout,prefix,sr,hw', [
    ('qkv', 1, 1, (14, 14)),
    ('qkv', 0, 1, (7, 9)),
    ('q_kv', 0, 1, (12, 12)),
    ('q_kv', 0, 2, (12, 10)),
])
def test_fused_equals_explicit(layout, prefix, sr, hw):
    m = _randomize(AgentAttention(32, num_heads=2, agent_num=9, window_size=(12, 12), qkv_layout=layout,
                                  num_prefix_tokens=prefix, sr_ratio=sr)).eval()
    x = torch.randn(2, prefix + hw[0] * hw[1], 32)
    m.fused_attn = True
    y_fused = m(x, hw)
    m.fused_attn = False
    y_explicit = m(x, hw)
    assert y_fused.shape == x.shape
    torch.testing.assert_close(y_fused, y_explicit, atol=1e-5, rtol=1e-5)


def test_fused_equals_explicit_gradients():
    m = _randomize(AgentAttention(32, num_heads=2, agent_num=16, window_size=(8, 8), num_prefix_tokens=1)).train()
    x = torch.randn(2, 65, 32)
    grads = []
    for fused in (True, False):
        m.zero_grad()
        m.fused_attn = fused
        m(x, (8, 8)).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert set(grads[0]) == {n for n, _ in m.named_parameters()}
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-4, rtol=1e-4, msg=n)
        assert grads[0][n].abs().sum() > 0, f'{n} got no gradient'
    # Frozen biases (no gradient for attn_mask): the CPU trains through SDPA's own backward, same gradients
    for p in m._bias_params():
        p.requires_grad_(False)
    frozen = []
    for fused in (True, False):
        m.zero_grad()
        m.fused_attn = fused
        xg = x.clone().requires_grad_()
        m(xg, (8, 8)).square().sum().backward()
        frozen.append({'x': xg.grad, **{n: p.grad for n, p in m.named_parameters() if p.requires_grad}})
    for n in frozen[0]:  # large random weights: gradients up to ~1e4, compared relative to their largest entry
        assert (frozen[0][n] - frozen[1][n]).abs().max() < 1e-5 * frozen[0][n].abs().max(), n


def _three_paths(m: AgentAttention, fn):
    """Outputs of the factored, SDPA and explicit paths of ``m`` (restoring its flags)."""
    outs = []
    for fused, factored in ((True, True), (True, False), (False, None)):
        m.fused_attn, m.factored = fused, factored
        assert m.use_factored() is bool(factored)
        outs.append(fn())
    m.fused_attn, m.factored = True, None
    return outs


@pytest.mark.parametrize('layout,prefix,sr,hw,agent_hw', [
    ('qkv', 1, 1, (14, 14), None),
    ('qkv', 0, 1, (7, 9), None),
    ('q_kv', 0, 1, (12, 12), None),
    ('q_kv', 0, 2, (12, 10), None),
    ('q_kv', 0, 1, (11, 13), (2, 4)),
    ('qkv', 0, 1, (12, 12), (4, 4)),
])
def test_factored_equals_sdpa_and_explicit(layout, prefix, sr, hw, agent_hw):
    m = _randomize(AgentAttention(32, num_heads=2, agent_num=9, window_size=(12, 12), qkv_layout=layout,
                                  num_prefix_tokens=prefix, sr_ratio=sr)).eval()
    if agent_hw:
        m.agent_hw = agent_hw
    x = torch.randn(2, prefix + hw[0] * hw[1], 32)
    with torch.no_grad():
        m.fused_attn = False
        truth = m.double()(x.double(), hw)  # the explicit path in float64: the reference for all three fp32 paths
        m.float()
        factored, sdpa, explicit = _three_paths(m, lambda: m(x, hw))
    assert factored.shape == x.shape
    scale = truth.abs().max()
    for got in (factored, sdpa, explicit):
        assert (got.double() - truth).abs().max() < 2e-6 * scale


@pytest.mark.parametrize('prefix', [0, 1])
@pytest.mark.parametrize('per_head', [False, True])
def test_factored_gradients_equal_explicit(prefix, per_head):
    # Compared against the explicit path in float64 (the truth up to ~1e-15): large random weights make the softmaxes
    # peaked, so two fp32 paths differ from each other by more than either differs from the truth. per_head: the
    # factored path's per-head value GEMMs (used under autograd for many agents) instead of block-diagonal ones.
    m = _randomize(AgentAttention(32, num_heads=2, agent_num=4, window_size=(8, 8), num_prefix_tokens=prefix)).train()
    m.per_head_min_agents = 0 if per_head else 1 << 30
    x = torch.randn(2, prefix + 64, 32)

    def grads(dtype):
        m.to(dtype).zero_grad()
        xg = x.to(dtype).clone().requires_grad_()
        m(xg, (8, 8)).square().sum().backward()
        return {'x': xg.grad.double(), **{n: p.grad.double() for n, p in m.named_parameters()}}

    m.fused_attn = False
    truth = grads(torch.float64)
    for got in _three_paths(m, lambda: grads(torch.float32)):
        for n, ref in truth.items():
            err = (got[n] - ref).abs().max() / ref.abs().max()
            if n == 'qkv.bias':
                # b_k is constant along the stage-1 softmax axis: its true gradient is 0 (the factored path drops it)
                err = max((got[n][:32] - ref[:32]).abs().max(), (got[n][64:] - ref[64:]).abs().max()) / ref.abs().max()
                assert ref[32:64].abs().max() < 1e-9 * ref.abs().max()
            assert err < 1e-5, (n, err.item())


def test_factored_is_automatic_for_few_agents_per_channel():
    wide = AgentAttention(64, num_heads=1, agent_num=9, window_size=(8, 8), qkv_layout='q_kv').eval()
    narrow = AgentAttention(64, num_heads=4, agent_num=16, window_size=(8, 8)).eval()
    assert wide.use_factored() and not narrow.use_factored()  # 9 <= 64/2; 64 > 64/2
    wide.fused_attn = False
    assert not wide.use_factored(), 'the explicit path is never factored'
    dropped = AgentAttention(64, num_heads=1, agent_num=9, window_size=(8, 8), attn_drop=0.1).train()
    assert not dropped.use_factored(), 'attention dropout breaks the row-sum identity the factored path relies on'
    assert dropped.eval().use_factored()


def test_attend_with_external_weights_matches_forward_qkv():
    # CSwin keeps its q/k/v projection in the block and calls attend() with its weights
    m = _randomize(AgentAttention(32, num_heads=2, agent_num=4, window_size=(6, 6), qkv_layout='none', proj=False,
                                  dwc_name='get_v')).eval()
    lin = torch.nn.Linear(32, 96)
    x = torch.randn(2, 36, 32)
    with torch.no_grad():
        q, k, v = lin(x).reshape(2, 36, 3, 32).unbind(2)
        ref = m.forward_qkv(q, k, v, (6, 6))
        m.factored = True
        out = m.attend(x, (6, 6), split_qkv(lin.weight, lin.bias))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_functional_matches_manual_softmax():
    q, k, v = torch.randn(3, 2, 2, 20, 8).unbind(0)
    agents = torch.randn(2, 2, 4, 8)
    b1, b2 = torch.randn(1, 2, 4, 20), torch.randn(1, 2, 20, 4)
    ref = ((q @ agents.transpose(-1, -2)) * 0.5 + b2).softmax(-1) @ (
        ((agents @ k.transpose(-1, -2)) * 0.5 + b1).softmax(-1) @ v)
    for fused in (True, False):
        torch.testing.assert_close(agent_attention(q, k, v, agents, b1, b2, 0.5, fused=fused), ref)


def test_resize_bias_identity_and_shape():
    b = torch.randn(1, 2, 9, 14, 1)
    assert resize_bias_1d(b, 14, 3) is b
    r = resize_bias_1d(b, 28, 3)
    assert r.shape == (1, 2, 9, 28, 1)
    # linear resize preserves a constant bias exactly
    c = torch.full((1, 2, 9, 1, 5), 0.3)
    torch.testing.assert_close(resize_bias_1d(c, 11, 4), torch.full((1, 2, 9, 1, 11), 0.3))


def test_bias_cache_hits_and_invalidates():
    m = _randomize(AgentAttention(16, num_heads=2, agent_num=4, window_size=(6, 6))).eval()
    with torch.no_grad():
        b1, b2 = m.get_biases((6, 6))
        assert m.get_biases((6, 6))[0] is b1, 'eval/no-grad biases must be cached'
        assert m.get_biases((8, 5))[0].shape == (1, 2, 4, 40)
        m.an_bias.add_(1.0)  # an in-place update (optimizer step, load_state_dict) bumps the version
        b1_new, _ = m.get_biases((6, 6))
        assert b1_new is not b1
        torch.testing.assert_close(b1_new, b1 + 1.0)
        sd = {k: v.clone() for k, v in m.state_dict().items()}
        sd['ha_bias'] += 2.0
        m.load_state_dict(sd)
        torch.testing.assert_close(m.get_biases((6, 6))[1], b2 + 2.0)
    # with grad enabled nothing is cached (the biases must receive gradients)
    b1_grad, _ = m.get_biases((6, 6))
    assert b1_grad.requires_grad and b1_grad is not m.get_biases((6, 6))[0]
    # biases are broadcast over the batch, never repeated
    assert b1_grad.shape[0] == 1


def test_bias_cache_keeps_only_small_biases(monkeypatch):
    m = _randomize(AgentAttention(16, num_heads=2, agent_num=4, window_size=(6, 6))).eval()
    small = 2 * (2 * 4 * 36) * 4  # bytes of the fp32 (b1, b2) pair at 6x6
    monkeypatch.setattr(AgentAttention, 'bias_cache_max_bytes', small)
    x = torch.randn(2, 100, 16)
    with torch.no_grad():
        b1, _ = m.get_biases((6, 6))
        assert m.get_biases((6, 6))[0] is b1, 'a pair within the budget is cached'
        big1, big2 = m.get_biases((10, 10))
        assert m.get_biases((10, 10))[0] is not big1, 'a pair over the budget is rebuilt per call'
        assert len(m._bias_cache) == 1
        y_uncached = m(x, (10, 10))
        monkeypatch.setattr(AgentAttention, 'bias_cache_max_bytes', 1 << 30)
        torch.testing.assert_close(m.get_biases((10, 10))[0], big1, rtol=0, atol=0)
        torch.testing.assert_close(m(x, (10, 10)), y_uncached, rtol=0, atol=0)


def test_agent_grid_override_resizes_biases():
    m = _randomize(AgentAttention(16, num_heads=2, agent_num=9, window_size=(12, 12))).eval()
    m.agent_hw = (4, 5)
    with torch.no_grad():
        y = m(torch.randn(1, 144, 16), (12, 12))
        b1, b2 = m.get_biases((12, 12))
    assert torch.isfinite(y).all()
    assert b1.shape == (1, 2, 20, 144) and b2.shape == (1, 2, 144, 20)


def test_bad_token_count_names_shapes():
    m = AgentAttention(16, num_heads=2, agent_num=4, window_size=(6, 6))
    with pytest.raises(ValueError, match=r'6x6'):
        m(torch.randn(1, 35, 16), (6, 6))
    with pytest.raises(ValueError, match='square'):
        AgentAttention(16, num_heads=2, agent_num=10)


def test_single_item_batch_uses_gemm_aggregation_and_matches():
    """B x H below the thread count takes the GEMM path for the aggregation stage; results are unchanged."""
    m = _randomize(AgentAttention(16, num_heads=1, agent_num=9, window_size=(10, 10), qkv_layout='q_kv')).eval()
    x = torch.randn(1, 100, 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y_mixed = m(x, (10, 10))
        m.fused_attn = False
        y_explicit = m(x, (10, 10))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(y_mixed, y_explicit, atol=1e-5, rtol=1e-5)


def test_inference_mlp_runs_gelu_in_place_with_identical_results():
    from timm.layers import Mlp as TimmMlp

    from vitzoo.models import Mlp
    ours, ref = Mlp(16, 64), TimmMlp(16, 64)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 10, 16)
    seen = {}
    ours.fc1.register_forward_hook(lambda m, i, o: seen.update(fc1=o.data_ptr()))
    ours.fc2.register_forward_pre_hook(lambda m, i: seen.update(fc2=i[0].data_ptr()))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x), rtol=0, atol=0)
    assert seen['fc1'] == seen['fc2'], 'no-grad inference must reuse the hidden tensor'
    # with autograd recording it is timm's forward (and gradients flow)
    y = ours(x)
    assert seen['fc1'] != seen['fc2']
    y.sum().backward()
    assert ours.fc1.weight.grad is not None


@pytest.mark.parametrize('dtype', ['fp32', 'bf16'])
@pytest.mark.parametrize('onednn', [False, True])
def test_training_mlp_fused_backward_bit_identical(dtype, onednn):
    """The training Mlp's backward reuses its saved activations as gradient buffers: same outputs and gradients as
    timm's Mlp — bit for bit with aten's GEMMs (fp32, and always under bf16 autocast), to float rounding with the
    fp32 oneDNN GEMMs of vitzoo.layers.linear — one backward per forward, and an opt-out."""
    from timm.layers import Mlp as TimmMlp
    from torch.profiler import profile

    from vitzoo.layers.linear import onednn_training_enabled, set_onednn_training
    from vitzoo.models import Mlp
    ours, ref = Mlp(16, 64), TimmMlp(16, 64)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 10, 16)
    w = torch.randn(2, 10, 16)
    results = []
    before = onednn_training_enabled()
    set_onednn_training(onednn)
    try:
        for m in (ours, ref):
            xx = x.clone().requires_grad_()
            with profile() as prof:
                with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bf16'):
                    y = m(xx)
                (y.float() * w).sum().backward()
            if m is ours:
                assert type(y.grad_fn).__name__ == '_GeluMlpFunctionBackward'  # the fused path ran
                ran = sum(e.name == 'mkldnn::_linear_pointwise' for e in prof.events())
                # fc1, fc2 forward; dL/da (small: a fresh tensor); fc1 input grad — fp32 only (autocast keeps aten's)
                assert ran == (4 if onednn and dtype == 'fp32' else 0)
            results.append([y.detach(), xx.grad] + [p.grad for p in m.parameters()])
    finally:
        set_onednn_training(before)
    tol = 1e-5 if onednn and dtype == 'fp32' else 0
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    y = ours(x.requires_grad_()).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='fused_backward = False'):
        y.backward()
    ours.fused_backward = False  # opt-out: autograd's own backward, any number of passes
    y = ours(x).sum()
    assert type(y.grad_fn.next_functions[0][0]).__name__ != '_GeluMlpFunctionBackward'
    y.backward(retain_graph=True)
    y.backward()


def test_training_mlp_large_hidden_gradient_reuses_the_activation_buffer():
    """With oneDNN on, dL/da of a hidden tensor at or above ``grad_buffer_min_bytes`` (32 MiB; lowered here) goes into
    the saved activation's buffer through aten's GEMM instead of oneDNN's fresh output; gradients as timm's both
    ways."""
    from timm.layers import Mlp as TimmMlp
    from torch.profiler import profile

    from vitzoo.models import Mlp
    ours, ref = Mlp(16, 64), TimmMlp(16, 64)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 10, 16)
    assert Mlp.grad_buffer_min_bytes == 32 << 20
    calls = {}
    for limit in (Mlp.grad_buffer_min_bytes, 2 * 10 * 64 * 4):  # the class default; exactly this hidden tensor's size
        ours.grad_buffer_min_bytes = limit
        ours.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        with profile() as prof:
            ours(xx).square().sum().backward()
        calls[limit] = sum(e.name == 'mkldnn::_linear_pointwise' for e in prof.events())
        ref.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        ref(xr).square().sum().backward()
        torch.testing.assert_close(xx.grad, xr.grad, rtol=1e-5, atol=1e-5)
        for p, q in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)
    assert list(calls.values()) == [4, 3]


def test_use_sdpa_rule():
    """SDPA unless a CPU backward would be slow: a mask that needs a gradient, or bf16 / fp16 inputs."""
    from vitzoo.layers.sdpa import use_sdpa
    q = torch.randn(2, 2, 5, 4, requires_grad=True)
    mask = torch.zeros(1, 2, 5, 5, requires_grad=True)
    assert use_sdpa(q, q, q) and use_sdpa(q, q, q, mask.detach())
    assert not use_sdpa(q, q, q, mask)
    qb = q.detach().bfloat16().requires_grad_()
    assert not use_sdpa(qb, qb, qb)
    assert use_sdpa(qb.detach(), qb.detach(), qb.detach())  # nothing to differentiate: the fast SDPA forward
    with torch.no_grad():
        assert use_sdpa(qb, qb, qb) and use_sdpa(q, q, q, mask)


def test_bf16_training_takes_the_explicit_path():
    """Under bf16 autocast a CPU training step avoids SDPA's slow reduced-precision backward (CSwin stripes, PVT
    spatial reduction, the agent attention with frozen biases) and keeps SDPA in inference."""
    from torch.profiler import profile

    from vitzoo.models.agent_cswin import LePEAttention
    from vitzoo.models.agent_pvt import SpatialReductionAttention
    lepe, sra = LePEAttention(32, 2, idx=0, split_size=4), SpatialReductionAttention(32, 2, sr_ratio=2)
    agent = _randomize(AgentAttention(32, num_heads=2, agent_num=4, window_size=(8, 8))).train()
    agent.factored = False
    for p in agent._bias_params():
        p.requires_grad_(False)
    x = torch.randn(2, 64, 32, requires_grad=True)
    q, k, v = (torch.randn(2, 64, 32, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))  # projected
    calls = [lambda: lepe(q, k, v, (8, 8)), lambda: sra(x, (8, 8)), lambda: agent(x, (8, 8))]
    for fn in calls:
        with profile() as prof, torch.autocast('cpu', dtype=torch.bfloat16):
            out = fn()
        assert out.dtype == torch.bfloat16
        assert not [e.key for e in prof.key_averages() if 'scaled_dot_product' in e.key]
        with torch.no_grad(), profile() as prof, torch.autocast('cpu', dtype=torch.bfloat16):
            fn()
        assert [e.key for e in prof.key_averages() if 'scaled_dot_product' in e.key]


@pytest.mark.parametrize('hw,out', [((14, 14), (7, 7)), ((56, 56), (3, 3)), ((9, 13), (4, 5)), ((7, 5), (7, 5))])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_agent_pooling_gradient_matches_adaptive_avg_pool(hw, out, dtype):
    """The agent pooling's GEMM backward gives aten's adaptive-pooling gradient for the channels-last token views the
    models pool (uniform and overlapping bins), and never runs aten's backward kernel."""
    from torch.profiler import profile
    from vitzoo.layers.agent_attention import adaptive_avg_pool
    torch.manual_seed(0)
    (h, w), C = hw, 8
    base = torch.randn(2, h * w, 3 * C, dtype=dtype, requires_grad=True)
    grid = base[:, :, :C].reshape(2, h, w, C).permute(0, 3, 1, 2)  # a q slice of a fused qkv output
    g = torch.randn(2, C, *out, dtype=dtype)
    ref_out = torch.nn.functional.adaptive_avg_pool2d(grid, out)
    ref = torch.autograd.grad(ref_out, base, g)[0]
    with profile() as prof:
        y = adaptive_avg_pool(grid, out)
        got = torch.autograd.grad(y, base, g)[0]
    assert not any('adaptive_avg_pool2d_backward' in e.name for e in prof.events())
    assert torch.equal(y, ref_out)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-7)
    else:  # the bin means are rounded to bf16 before the 0/1 GEMMs: about one rounding step of the scale apart
        scale = ref.float().abs().max().item()
        torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -7, atol=scale * 2 ** -7)


def test_agent_pooling_double_backward_and_plain_paths():
    from vitzoo.layers.agent_attention import adaptive_avg_pool
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: adaptive_avg_pool(t, (4, 3)), (x,))
    assert torch.autograd.gradgradcheck(lambda t: adaptive_avg_pool(t, (4, 3)) ** 2, (x,))
    with torch.no_grad():  # inference: aten's kernel itself
        assert adaptive_avg_pool(x, (4, 3)).grad_fn is None
    assert type(adaptive_avg_pool(x, (4, 3)).grad_fn).__name__ == '_AdaptiveAvgPoolBackward'
    assert type(adaptive_avg_pool(x.detach(), (4, 3))).__name__ == 'Tensor'


@pytest.mark.parametrize('size', [(28, 28), (56, 56), (5, 9), (7, 7), (3, 2)])
def test_bilinear_resize_matches_interpolate(size):
    from vitzoo.layers.agent_attention import bilinear_resize
    torch.manual_seed(0)
    x = torch.randn(2, 9, 7, 7, requires_grad=True)
    ref = torch.nn.functional.interpolate(x, size=size, mode='bilinear', align_corners=False)
    out = bilinear_resize(x, size)
    out_cl = bilinear_resize(x.permute(0, 2, 3, 1), size, channels_last=True).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(out_cl, ref, rtol=0, atol=2e-6)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out_cl, x, g)[0], torch.autograd.grad(ref, x, g)[0],
                               rtol=1e-6, atol=2e-5)


def test_biases_are_built_in_fp32_under_autocast():
    """The GEMM resize of the agent biases runs in fp32 under bf16 autocast, as F.interpolate does; the biases equal
    the compiled path's F.interpolate construction."""
    torch.manual_seed(0)
    m = AgentAttention(32, 2, 16, window_size=(8, 8), num_prefix_tokens=1)
    for p in m.parameters():
        p.data.normal_()
    ref1, ref2 = m._compute_biases((8, 8), (8, 8), torch.float32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        b1, b2 = m._compute_biases((8, 8), (8, 8), torch.float32)
    assert b1.dtype == b2.dtype == torch.float32
    torch.testing.assert_close(b1, ref1, rtol=0, atol=0)
    torch.testing.assert_close(b2, ref2, rtol=0, atol=0)
    # the F.interpolate construction (compiled / exported graphs)
    up1 = torch.nn.functional.interpolate(m.an_bias, size=(8, 8), mode='bilinear', align_corners=False)
    exp1 = torch.cat([m.ac_bias, (up1.reshape(1, 2, 16, 64) + (m.ah_bias + m.aw_bias).reshape(1, 2, 16, 64))], -1)
    up2 = torch.nn.functional.interpolate(m.na_bias, size=(8, 8), mode='bilinear', align_corners=False)
    exp2 = torch.cat([m.ca_bias, up2.flatten(2).transpose(-1, -2).unsqueeze(0)
                      + (m.ha_bias + m.wa_bias).reshape(1, 2, 64, 16)], -2)
    torch.testing.assert_close(b1, exp1, rtol=0, atol=1e-6)
    torch.testing.assert_close(b2, exp2, rtol=0, atol=1e-6)
