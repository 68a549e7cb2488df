"""Agent-PVT: parity with the official implementation, resolutions, checkpoints, sizes, reduced precision."""
import pytest
import timm
import torch

import vitzoo  # noqa: F401
from vitzoo.models import CheckpointError
from vitzoo.utils import count_macs, count_params, explicit_attention

from conftest import load_parity, parity_input

_ARCH_KEYS = ('embed_dims', 'num_heads', 'mlp_ratios', 'depths', 'sr_ratios', 'agent_sr_ratios', 'agent_num',
              'attn_type')
# the reference files' architecture (reduced widths, one block per stage), for models built without a file
_SMALL = dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 1, 1))


def _build_from_ref(ref, path, name='agent_pvt_tiny', **kw):
    k = ref['official_kwargs']
    return timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=k['num_classes']),
        num_classes=k['num_classes'], **{a: k[a] for a in _ARCH_KEYS}, **kw).eval()


def _max_diff(model, ref, x=None):
    with torch.no_grad():
        return (model(parity_input(ref) if x is None else x) - ref['output']).abs().max().item()


@pytest.mark.parametrize('ref_name', ['agent_pvt-like.pt', 'agent_pvt_mixed-like.pt'])
@pytest.mark.parametrize('fused', [True, False])
def test_parity_with_official(ref_name, fused, official_file):
    """All-agent ('AAAA') and mixed ('AABB': PVT spatial-reduction attention in stages 3-4) official models."""
    ref = load_parity(ref_name)
    model = _build_from_ref(ref, official_file(ref['state_dict']))
    assert model.attn_type == ref['official_kwargs']['attn_type']
    if fused:
        assert _max_diff(model, ref) <= 1e-5
    else:
        with explicit_attention(model):
            assert not any(m.fused_attn for m in model.modules() if hasattr(m, 'fused_attn'))
            assert _max_diff(model, ref) <= 1e-5


def test_official_checkpoint_variants_load(official_file, tmp_path):
    """Plain state_dict, DDP 'module.' prefix + 'state_dict' nesting, EMA weights and vitzoo keys load the same."""
    ref = load_parity('agent_pvt_mixed-like.pt')
    sd = ref['state_dict']
    assert _max_diff(_build_from_ref(ref, official_file(sd, wrap='')), ref) <= 1e-5
    prefixed = {'module.' + k: v for k, v in sd.items()}
    assert _max_diff(_build_from_ref(ref, official_file(prefixed, wrap='state_dict')), ref) <= 1e-5
    # raw + EMA weights: the official evaluation (main.py) uses 'model' (manifest format.use_ema False); EMA on request
    path = tmp_path / 'ema.pth'
    torch.save({'model': {k: torch.zeros_like(v) for k, v in sd.items()}, 'state_dict_ema': prefixed}, path)
    assert _max_diff(_build_from_ref(ref, str(path)), ref) > 1e-2
    model = _build_from_ref(ref, str(path), pretrained_use_ema=True)
    assert _max_diff(model, ref) <= 1e-5
    # a checkpoint saved from a vitzoo model (timm-style keys) passes through unchanged
    assert 'stages.2.blocks.0.attn.sr.weight' in model.state_dict()
    assert _max_diff(_build_from_ref(ref, official_file(model.state_dict())), ref) <= 1e-5


def test_checkpoint_into_other_resolution(official_file):
    """A 224 checkpoint in a model built at 288 (position embeddings and agent biases resized) gives the outputs of
    the 224 model run at 288, since both resize the same way."""
    ref = load_parity('agent_pvt-like.pt')
    path = official_file(ref['state_dict'])
    model = _build_from_ref(ref, path, img_size=288)
    attn = model.stages[0].blocks[0].attn
    assert attn.ah_bias.shape == (1, 1, 9, 72, 1) and attn.wa_bias.shape == (1, 1, 1, 72, 9)
    assert [s.pos_embed.shape[1] for s in model.stages] == [72 * 72, 36 * 36, 18 * 18, 9 * 9]
    x = torch.nn.functional.interpolate(parity_input(ref), size=288, mode='bilinear')
    with torch.no_grad():
        y = model(x)
        y224 = _build_from_ref(ref, path)(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y224, atol=1e-5, rtol=0)


def test_any_resolution_and_default_unchanged():
    """A reduced-width 224 model runs at 1.25x (280: odd 35/17 grids), non-square sizes and with spatially reduced
    agent stages; its 224 output does not change afterwards (bias caches are per grid)."""
    torch.manual_seed(0)
    for kw in (dict(), dict(attn_type='AABB', agent_sr_ratios='2211')):
        model = timm.create_model('agent_pvt_tiny', num_classes=10, **_SMALL, **kw).eval()
        x = torch.randn(2, 3, 224, 224)
        with torch.no_grad():
            y0 = model(x)
            y280 = model(torch.randn(1, 3, 280, 280))
            y_rect = model(torch.randn(2, 3, 192, 320))
            feats = model.forward_intermediates(torch.randn(1, 3, 280, 280), intermediates_only=True)
            y1 = model(x)
        assert y280.shape == (1, 10) and y_rect.shape == (2, 10)
        assert torch.isfinite(y280).all() and torch.isfinite(y_rect).all()
        assert [tuple(f.shape[-2:]) for f in feats] == [(70, 70), (35, 35), (17, 17), (8, 8)]
        assert torch.equal(y0, y1)


def test_deprecated_stage_name():
    from vitzoo.models.agent_pvt import AgentPVTStage, AgentPvtStage
    assert AgentPvtStage is AgentPVTStage
    model = timm.create_model('agent_pvt_tiny', num_classes=10, **_SMALL)
    assert all(type(s) is AgentPVTStage for s in model.stages)
    assert isinstance(model.norm, torch.nn.Identity)  # no final norm (the shared shell's slot)


def test_input_smaller_than_the_last_stage_is_an_error():
    """(A non-multiple input: the contract in test_models.py.)"""
    model = timm.create_model('agent_pvt_tiny', num_classes=10, **_SMALL).eval()
    with pytest.raises(ValueError, match='16x64 is smaller than 32'):
        model(torch.randn(1, 3, 16, 64))


def test_bad_checkpoint_names_key_and_shapes(official_file):
    ref = load_parity('agent_pvt-like.pt')
    sd = dict(ref['state_dict'])
    sd['block2.0.attn.kv.weight'] = torch.zeros(32, 32)
    with pytest.raises(CheckpointError,
                       match=r"'stages\.1\.blocks\.0\.attn\.kv\.weight' has shape \(32, 32\).*expects \(64, 32\)"):
        _build_from_ref(ref, official_file(sd))
    sd = dict(ref['state_dict'])
    del sd['block1.0.attn.dwc.weight']
    missing = r"missing key 'stages\.0\.blocks\.0\.attn\.dwc\.weight' \(expected shape \(16, 1, 3, 3\)\)"
    with pytest.raises(CheckpointError, match=missing):
        _build_from_ref(ref, official_file(sd))
    # the mixed (AABB) checkpoint does not fit an all-agent model: the missing agent biases are reported
    mixed = load_parity('agent_pvt_mixed-like.pt')
    with pytest.raises(CheckpointError, match=r"missing key 'stages\.2\.blocks\.0\.attn\.an_bias'"):
        _build_from_ref(ref, official_file(mixed['state_dict']))


def test_autocast_fp16_bf16_1024_finite():
    """Reduced-precision CPU autocast at 1024x1024 (65536 stage-1 tokens attending 9 agents): no NaN / inf, and the
    fp16 and bf16 logits agree to bf16 precision."""
    torch.manual_seed(0)
    model = timm.create_model('agent_pvt_small').eval()
    x = torch.randn(1, 3, 1024, 1024)
    out = {}
    for dtype in (torch.float16, torch.bfloat16):
        with torch.no_grad(), torch.autocast('cpu', dtype=dtype):
            out[dtype] = model(x)
        assert out[dtype].dtype == dtype
        assert torch.isfinite(out[dtype]).all(), dtype
    y16, ybf = out[torch.float16].float(), out[torch.bfloat16].float()
    assert (y16 - ybf).abs().max().item() < 0.02 * y16.abs().max().item()


# name: (params in M, GMACs) measured from the official models
SPEC = {
    'agent_pvt_tiny': (11.57, 1.99),
    'agent_pvt_small': (20.64, 3.95),
    'agent_pvt_medium': (35.92, 7.00),
    'agent_pvt_medium_256': (36.08, 9.14),
    'agent_pvt_large': (48.74, 10.34),
}


@pytest.mark.parametrize('name', sorted(SPEC))
def test_params_and_flops_match_official(name):
    model = timm.create_model(name)
    params, gmacs = SPEC[name]
    assert abs(count_params(model) / 1e6 - params) / params < 0.005
    assert abs(count_macs(model, model.pretrained_cfg['input_size']) / 1e9 - gmacs) / gmacs < 0.01
