"""vitzoo.layers.linear: oneDNN GEMMs for recorded CPU fp32 linear layers, F.linear everywhere else."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import profile

import vitzoo  # noqa: F401  (registers the models)
from vitzoo.layers.linear import Linear, linear, onednn_training_enabled, set_onednn_training, use_onednn

ONEDNN_OP = 'mkldnn::_linear_pointwise'


@pytest.fixture
def onednn():
    """Restore the global switch whatever a test sets."""
    before = onednn_training_enabled()
    yield
    set_onednn_training(before)


def _onednn_calls(fn) -> int:
    with profile() as prof:
        fn()
    return sum(e.name == ONEDNN_OP for e in prof.events())


def test_available_on_this_build():
    # The CI machines' torch has oneDNN: the fast path must be on by default there, not silently absent.
    assert torch.backends.mkldnn.is_available()
    assert onednn_training_enabled()


@pytest.mark.parametrize('shape', [(5, 7), (2, 3, 7), (4, 3, 5, 7)])
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('x_grad', [True, False])
def test_matches_f_linear_values_and_gradients(shape, bias, x_grad):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=x_grad)
    w = torch.randn(11, 7, requires_grad=True)
    b = torch.randn(11, requires_grad=True) if bias else None
    y = linear(x, w, b)
    assert type(y.grad_fn).__name__ == '_OneDnnLinearBackward'
    g = torch.randn_like(y)
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    ours = torch.autograd.grad(y, leaves, g)
    ref_y = F.linear(x, w, b)
    ref = torch.autograd.grad(ref_y, leaves, g)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    for a, r in zip(ours, ref):
        assert a.shape == r.shape
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_non_contiguous_input_and_gradient():
    x = torch.randn(7, 6, 5).permute(2, 1, 0).requires_grad_()  # (5, 6, 7), channels strided
    w = torch.randn(3, 7, requires_grad=True)
    y = linear(x, w)
    g = torch.randn(3, 6, 5).permute(2, 1, 0)  # a strided incoming gradient
    gx, gw = torch.autograd.grad(y, (x, w), g)
    rx, rw = torch.autograd.grad(F.linear(x, w), (x, w), g)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)


def test_f_linear_wherever_the_path_does_not_apply(onednn):
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(2, 3)
    assert use_onednn(x, w)
    with torch.no_grad():
        assert not use_onednn(x, w)
        assert _onednn_calls(lambda: linear(x, w)) == 0  # inference: aten's kernels
    assert not use_onednn(x, w.detach())  # nothing to differentiate
    assert not use_onednn(x.double(), w.double())
    assert not use_onednn(x.half(), w.half())
    with torch.autocast('cpu', dtype=torch.float16):
        assert not use_onednn(x, w)
        y = linear(x, w)
    assert y.dtype == torch.float16 and type(y.grad_fn).__name__ != '_OneDnnLinearBackward'
    set_onednn_training(False)
    assert not use_onednn(x, w)
    y = linear(x, w)
    assert type(y.grad_fn).__name__ != '_OneDnnLinearBackward'
    (gw,) = torch.autograd.grad(linear(x, w).square().sum(), w, create_graph=True)
    gw.sum().backward()  # double backward works with the switch off
    assert w.grad is not None


@pytest.mark.parametrize('bias', [True, False])
def test_autocast_and_bf16_keep_aten(bias):
    """Under CPU autocast (its bf16 GEMMs already run in oneDNN) and for bf16 tensors the layer is F.linear exactly."""
    torch.manual_seed(0)
    x = torch.randn(6, 5, 16, requires_grad=True)
    w = torch.randn(24, 16, requires_grad=True)
    b = torch.randn(24, requires_grad=True) if bias else None
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not use_onednn(x, w, b)
        y = linear(x, w, b)
        ref = F.linear(x, w, b)
    assert y.dtype == torch.bfloat16 and type(y.grad_fn).__name__ != '_OneDnnLinearBackward'
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    xb, wb = x.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    assert not use_onednn(xb, wb) and _onednn_calls(lambda: linear(xb, wb).sum().backward()) == 0


def test_double_backward_needs_the_switch_off():
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(2, 3, requires_grad=True)
    (gx,) = torch.autograd.grad(linear(x, w).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match='once_differentiable|twice'):
        gx.sum().backward()


def test_compiled_graph_uses_f_linear():
    m = Linear(3, 4)
    x = torch.randn(2, 3, requires_grad=True)
    compiled = torch.compile(m, backend='aot_eager', fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, F.linear(x, m.weight, m.bias), rtol=1e-6, atol=1e-6)
    y.sum().backward()
    assert m.weight.grad is not None


def test_module_is_nn_linear_with_the_same_state_dict():
    ours = Linear(3, 4)
    ref = nn.Linear(3, 4)
    ref.load_state_dict(ours.state_dict())
    assert isinstance(ours, nn.Linear) and list(ours.state_dict()) == ['weight', 'bias']
    x = torch.randn(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)  # inference is F.linear exactly


@pytest.mark.parametrize('name', ['agent_swin_tiny', 'agent_pvt_tiny', 'agent_cswin_tiny'])
def test_model_training_step_runs_onednn_and_matches_aten(name, onednn):
    """A training step of the agent backbones takes the oneDNN GEMMs and gives aten's loss and gradients."""
    kw = dict(img_size=64, num_classes=10)
    if name == 'agent_swin_tiny':
        kw['window_size'] = 16
    torch.manual_seed(0)
    model = timm.create_model(name, **kw).train()
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([1, 7])
    grads = {}
    for on in (True, False):
        set_onednn_training(on)
        model.zero_grad(set_to_none=True)

        def step():
            F.cross_entropy(model(x), y).backward()
        calls = _onednn_calls(step)
        assert (calls > 0) == on
        grads[on] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for k, g in grads[True].items():
        torch.testing.assert_close(g, grads[False][k], rtol=1e-4, atol=2e-5, msg=k)
