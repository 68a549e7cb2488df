"""Agent-CSwin: parity with the official implementation, LePE padding, resolutions, checkpoints, sizes."""
import pytest
import timm
import torch
import torch.nn.functional as F

import vitzoo  # noqa: F401
from vitzoo.models import CheckpointError
from vitzoo.models.agent_cswin import LePEAttention
from vitzoo.utils import count_macs, count_params, explicit_attention

from conftest import load_parity, parity_input

REF = 'agent_cswin-like.pt'


def _ref_kwargs(ref):
    k = ref['official_kwargs']
    return dict(
        num_classes=k['num_classes'], embed_dim=k['embed_dim'], depth=k['depth'], split_size=k['split_size'],
        num_heads=k['num_heads'], agent_num=k['agent_num'], attn_type=k['attn_type'],
        la_split_size=k['la_split_size'])


def _build_from_ref(ref, path, name='agent_cswin_tiny', **kw):
    kwargs = dict(_ref_kwargs(ref), **kw)
    return timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=kwargs['num_classes']),
        **kwargs).eval()


def _max_diff(model, x, ref_out, fused=True):
    with torch.no_grad():
        if fused:
            y = model(x)
        else:
            with explicit_attention(model):
                y = model(x)
    return (y - ref_out).abs().max().item()


@pytest.mark.parametrize('fused', [True, False])
def test_parity_with_official(fused, official_file):
    ref = load_parity(REF)
    model = _build_from_ref(ref, official_file(ref['state_dict']))
    # stages 1-2: one global agent branch; stage 3: two striped LePE branches; stage 4: one global LePE branch
    assert [len(s.blocks[0].attns) for s in model.stages] == [1, 1, 2, 1]
    assert [s.blocks[0].is_agent for s in model.stages] == [True, True, False, False]
    assert model.stages[2].blocks[0].attns[1].idx == 1 and model.stages[3].blocks[0].attns[0].idx == -1
    assert _max_diff(model, parity_input(ref), ref['output'], fused) <= 1e-5


def test_official_checkpoint_variants_load(official_file, tmp_path):
    """EMA weights (preferred by timm), DDP 'module.' prefixes and vitzoo-format keys all load to the same output."""
    ref = load_parity(REF)
    x = parity_input(ref)
    sd = ref['state_dict']
    # EMA: the 'model' weights are garbage, so parity proves the EMA copy was loaded
    path = str(tmp_path / 'ema.pth')
    torch.save({'model': {k: torch.zeros_like(v) for k, v in sd.items()}, 'state_dict_ema': sd}, path)
    assert _max_diff(_build_from_ref(ref, path), x, ref['output']) <= 1e-5
    path = official_file({'module.' + k: v for k, v in sd.items()}, wrap='')
    model = _build_from_ref(ref, path)
    assert _max_diff(model, x, ref['output']) <= 1e-5
    # the remapped (vitzoo) names load unchanged
    path = official_file(model.state_dict())
    assert _max_diff(_build_from_ref(ref, path), x, ref['output']) <= 1e-5


def test_checkpoint_into_other_resolution(official_file):
    """A 224 checkpoint loads into a model built at 288: the agent row/column biases are resized."""
    ref = load_parity(REF)
    # the official agent split '56-28-14-7' is the 224 resolution: None makes the agent stages global at any size
    model = _build_from_ref(ref, official_file(ref['state_dict']), img_size=288, la_split_size=None)
    attn = model.stages[0].blocks[0].attns[0]
    assert attn.ah_bias.shape == (1, 1, 9, 72, 1) and attn.wa_bias.shape == (1, 1, 1, 72, 9)
    assert model.stages[1].blocks[1].attns[0].ha_bias.shape == (1, 2, 36, 1, 16)
    with torch.no_grad():
        y = model(F.interpolate(parity_input(ref), size=288))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_bad_checkpoint_names_key_and_shapes(official_file):
    ref = load_parity(REF)
    sd = dict(ref['state_dict'])
    sd['stage2.1.qkv.weight'] = torch.zeros(24, 24)
    with pytest.raises(CheckpointError, match=r"'stages\.1\.blocks\.1\.qkv\.weight' has shape \(24, 24\).*"
                                              r"expects \(72, 24\)"):
        _build_from_ref(ref, official_file(sd))
    sd = dict(ref['state_dict'])
    del sd['stage3.0.attns.1.get_v.weight']
    with pytest.raises(CheckpointError, match=r"missing key 'stages\.2\.blocks\.0\.attns\.1\.get_v\.weight' "
                                              r"\(expected shape \(24, 1, 3, 3\)\)"):
        _build_from_ref(ref, official_file(sd))
    sd = dict(ref['state_dict'])
    sd['stage1.0.attns.0.ah_bias'] = torch.zeros(1, 2, 9, 40, 1)  # wrong heads: reported, not resized
    with pytest.raises(CheckpointError, match=r"'stages\.0\.blocks\.0\.attns\.0\.ah_bias' has shape "
                                              r"\(1, 2, 9, 40, 1\).*expects \(1, 1, 9, 56, 1\)"):
        _build_from_ref(ref, official_file(sd))
    sd = dict(ref['state_dict'])
    sd['stage4.0.attns.0.an_bias'] = torch.zeros(8, 49, 7, 7)
    with pytest.raises(CheckpointError, match=r"unexpected key 'stages\.3\.blocks\.0\.attns\.0\.an_bias'"):
        _build_from_ref(ref, official_file(sd))


def _stripe_reference(attn, q, k, v, hw):
    """LePE attention computed stripe by stripe on the unpadded map: the last stripe is simply narrower."""
    B, N, C = q.shape
    h, w = hw
    H, d, s = attn.num_heads, attn.head_dim, attn.split_size
    maps = [t.reshape(B, h, w, C) for t in (q, k, v)]
    out = torch.empty(B, h, w, C)
    for start in range(0, w if attn.idx == 0 else h, s):
        sl = (slice(None), slice(None), slice(start, start + s)) if attn.idx == 0 else \
            (slice(None), slice(start, start + s))
        qs, ks, vs = (m[sl] for m in maps)
        sh, sw = qs.shape[1:3]
        lepe = attn.get_v(vs.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        qs, ks, vs = (t.reshape(B, sh * sw, H, d).transpose(1, 2) for t in (qs, ks, vs))
        o = ((qs * attn.scale) @ ks.transpose(-2, -1)).softmax(-1) @ vs
        out[sl] = o.transpose(1, 2).reshape(B, sh, sw, C) + lepe
    return out.reshape(B, N, C)


@pytest.mark.parametrize('idx,hw', [(0, (5, 7)), (1, (8, 4)), (0, (3, 2))])
@pytest.mark.parametrize('fused', [True, False])
def test_lepe_padding_equals_narrow_last_stripe(idx, hw, fused):
    torch.manual_seed(0)
    attn = LePEAttention(8, 2, idx=idx, split_size=3, fused_attn=fused).eval()
    q, k, v = (torch.randn(2, hw[0] * hw[1], 8) for _ in range(3))
    with torch.no_grad():
        y = attn(q, k, v, hw)
        y_ref = _stripe_reference(attn, q, k, v, hw)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_any_resolution_and_224_unchanged():
    """A (reduced-width) 224 model runs at 280 (1.25x), 128, 160 and 256x192; its 224 output is unchanged afterwards."""
    torch.manual_seed(0)
    model = timm.create_model('agent_cswin_tiny', num_classes=10, embed_dim=16, depth=(1, 2, 2, 1)).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        y0 = model(x)
        outs = {s: model(torch.randn(1, 3, *s)) for s in ((280, 280), (128, 128), (160, 160), (256, 192))}
        x_rect = torch.randn(1, 3, 256, 192)
        y_rect = model(x_rect)
        with explicit_attention(model):
            y_rect_explicit = model(x_rect)
        feats = model.forward_intermediates(x_rect, intermediates_only=True)
        y1 = model(x)
    for y in outs.values():
        assert y.shape == (1, 10) and torch.isfinite(y).all()
    # 256x192: stage 3 is 16x12 (both stripe directions padded), stage 4 is 8x6
    assert [tuple(f.shape[-2:]) for f in feats] == [(64, 48), (32, 24), (16, 12), (8, 6)]
    torch.testing.assert_close(y_rect, y_rect_explicit, atol=1e-5, rtol=1e-5)
    assert torch.equal(y0, y1)


def test_striped_agent_split_is_rejected():
    with pytest.raises(ValueError, match='striped agent attention'):
        timm.create_model('agent_cswin_tiny', embed_dim=16, depth=(1, 1, 1, 1), la_split_size='28-28-14-7')


def test_attn_type_and_deprecated_class_name():
    from vitzoo.models.agent_cswin import AgentCSWinTransformer, AgentCSwinTransformer
    assert AgentCSWinTransformer is AgentCSwinTransformer
    model = timm.create_model('agent_cswin_tiny', embed_dim=8, depth=(1, 3, 2, 1), num_heads=(2, 2, 2, 4),
                              attn_type='AMBB2')
    assert type(model) is AgentCSwinTransformer
    assert [[b.is_agent for b in s.blocks] for s in model.stages] == [[True], [True, True, False], [False, False],
                                                                      [False]]
    for bad in ('AAXB', 'AAMB', 'AABB3'):
        with pytest.raises(ValueError, match='attn_type'):
            timm.create_model('agent_cswin_tiny', attn_type=bad)


# name: (params in M, GMACs) measured from the official models
SPEC = {
    'agent_cswin_tiny': (20.46, 4.29),
    'agent_cswin_small': (32.81, 6.74),
    'agent_cswin_base': (73.25, 14.87),
    'agent_cswin_base_384': (73.33, 46.18),
}


def test_meta_counting_equals_real_counting():
    """The size test below counts on the meta device (fast); it gives the same numbers as a real model."""
    kw = dict(embed_dim=16, depth=(1, 2, 2, 1), num_heads=(1, 2, 4, 8))
    real = timm.create_model('agent_cswin_tiny', **kw)
    with torch.device('meta'):
        meta = timm.create_model('agent_cswin_tiny', **kw)
        meta_macs = count_macs(meta, (3, 224, 224))
    assert count_params(meta) == count_params(real)
    assert meta_macs == count_macs(real, (3, 224, 224))


@pytest.mark.parametrize('name', sorted(SPEC))
def test_params_and_flops_match_official(name):
    with torch.device('meta'):
        model = timm.create_model(name)
        macs = count_macs(model, model.pretrained_cfg['input_size'])
    params, gmacs = SPEC[name]
    assert abs(count_params(model) / 1e6 - params) / params < 0.005
    assert abs(macs / 1e9 - gmacs) / gmacs < 0.01
