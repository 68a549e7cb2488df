"""Agent-Swin: parity with the official implementation, window geometry, resolutions, checkpoints, sizes."""
import pytest
import timm
import torch

import vitzoo  # noqa: F401
from vitzoo.models import CheckpointError
from vitzoo.models.agent_swin import WindowAttention, window_attn_mask
from vitzoo.utils import count_macs, count_params, explicit_attention

from conftest import load_parity, parity_input

REF = 'agent_swin-like.pt'


def _ref_kwargs(ref):
    k = ref['official_kwargs']
    return dict(
        num_classes=k['num_classes'], embed_dim=k['embed_dim'], depths=k['depths'], num_heads=k['num_heads'],
        window_size=k['window_size'], mlp_ratio=k['mlp_ratio'], agent_num=k['agent_num'], attn_type=k['attn_type'])


def _build_from_ref(ref, path, name='agent_swin_tiny', **kw):
    kwargs = dict(_ref_kwargs(ref), **kw)
    return timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=kwargs['num_classes']),
        **kwargs).eval()


def _max_diff(model, ref, x=None):
    with torch.no_grad():
        return (model(parity_input(ref) if x is None else x) - ref['output']).abs().max().item()


@pytest.mark.parametrize('fused', [True, False])
def test_parity_with_official(fused, official_file):
    """'AAMB1': global agent stages 1-2 and stage-3 block 0; shifted window block; unshifted 7x7 stage 4."""
    ref = load_parity(REF)
    model = _build_from_ref(ref, official_file(ref['state_dict']))
    blocks = [b for stage in model.layers for b in stage.blocks]
    assert [b.is_agent for b in blocks] == [True] * 5 + [False] * 3
    assert [b.shift_size for b in blocks[5:]] == [3, 0, 0]
    with torch.no_grad():
        if fused:
            y = model(parity_input(ref))
        else:
            with explicit_attention(model):
                assert not any(m.fused_attn for m in model.modules() if hasattr(m, 'fused_attn'))
                y = model(parity_input(ref))
    assert (y - ref['output']).abs().max().item() <= 1e-5


def test_recomputed_shift_mask_equals_official():
    ref = load_parity(REF)
    model = timm.create_model('agent_swin_tiny', **_ref_kwargs(ref))
    official = ref['state_dict']['layers.2.blocks.1.attn_mask']
    assert torch.equal(model.layers[2].blocks[1].attn_mask, official)
    assert model.layers[3].blocks[1].attn_mask is None  # 7x7 map = window: no shift, no mask


def test_official_checkpoint_variants_load(official_file):
    """EMA nesting, DDP 'module.' prefixes, and no relative_position_index / attn_mask buffers: same outputs."""
    ref = load_parity(REF)
    sd = ref['state_dict']
    no_buffers = {k: v for k, v in sd.items() if not k.endswith(('relative_position_index', 'attn_mask'))}
    assert len(no_buffers) < len(sd)
    variants = [
        official_file({'module.' + k: v for k, v in sd.items()}, wrap='state_dict_ema'),
        official_file(no_buffers),
        official_file(sd, wrap=''),
    ]
    for path in variants:
        assert _max_diff(_build_from_ref(ref, path), ref) <= 1e-5


def test_vitzoo_state_dict_round_trip(official_file):
    """A checkpoint saved from a vitzoo model (timm layout: merge at the stage start) loads unchanged."""
    ref = load_parity(REF)
    model = _build_from_ref(ref, official_file(ref['state_dict']))
    sd = model.state_dict()
    assert 'layers.0.downsample.reduction.weight' not in sd and 'layers.3.downsample.reduction.weight' in sd
    official_merge = ref['state_dict']['layers.2.downsample.reduction.weight']
    assert torch.equal(sd['layers.3.downsample.reduction.weight'], official_merge)
    assert _max_diff(_build_from_ref(ref, official_file(sd)), ref) <= 1e-5


def test_checkpoint_into_other_resolution(official_file):
    """A 224 checkpoint into a 384 model (WINDOW_SIZE 96): agent biases and window tables are resized."""
    ref = load_parity(REF)
    model = _build_from_ref(ref, official_file(ref['state_dict']), img_size=384, window_size=96)
    assert model.layers[0].blocks[0].attn.ah_bias.shape == (1, 1, 9, 96, 1)
    assert model.layers[2].blocks[0].attn.wa_bias.shape == (1, 2, 1, 24, 49)
    assert model.layers[2].blocks[1].attn.relative_position_bias_table.shape == (23 * 23, 2)  # window 12
    assert model.layers[2].blocks[1].shift_size == 6 and model.layers[3].blocks[1].shift_size == 0
    with torch.no_grad():
        y = model(torch.nn.functional.interpolate(parity_input(ref), size=384))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_bad_checkpoint_names_key_and_shapes(official_file):
    ref = load_parity(REF)
    sd = dict(ref['state_dict'])
    sd['layers.2.blocks.1.attn.qkv.weight'] = torch.zeros(48, 32)
    with pytest.raises(CheckpointError,
                       match=r"'layers\.2\.blocks\.1\.attn\.qkv\.weight' has shape \(48, 32\).*expects \(96, 32\)"):
        _build_from_ref(ref, official_file(sd))
    sd = dict(ref['state_dict'])
    del sd['layers.0.blocks.0.attn.dwc.weight']
    missing = r"missing key 'layers\.0\.blocks\.0\.attn\.dwc\.weight' \(expected shape \(8, 1, 3, 3\)\)"
    with pytest.raises(CheckpointError, match=missing):
        _build_from_ref(ref, official_file(sd))
    sd = dict(ref['state_dict'])
    sd['layers.1.downsample.reduction.weight'] = torch.zeros(32, 32)  # official stage-1 merge = vitzoo layers.2
    with pytest.raises(CheckpointError, match=r"'layers\.2\.downsample\.reduction\.weight' has shape \(32, 32\)"):
        _build_from_ref(ref, official_file(sd))


def test_window_mask_shift_regions_and_padding():
    # 10x10 map, window 7, shift 3: padded to 14x14, 4 windows
    mask = window_attn_mask((10, 10), (7, 7), (3, 3))
    assert mask.shape == (4, 49, 49)
    pad = torch.zeros(1, 14, 14)
    pad[:, 10:] = 1
    pad[:, :, 10:] = 1
    pad = torch.roll(pad, (-3, -3), (1, 2)).reshape(2, 7, 2, 7).permute(0, 2, 1, 3).reshape(4, 49) > 0
    assert (mask.permute(0, 2, 1)[pad] == -100).all()  # every padded key is masked for every query
    assert (mask.diagonal(dim1=1, dim2=2)[~pad] == 0).all()  # real tokens see themselves
    assert window_attn_mask((14, 14), (7, 7), (0, 0)) is None
    assert window_attn_mask((9, 6), (7, 6), (0, 0)).shape == (2, 42, 42)  # padding only along H


def test_window_helpers():
    """Partition / reverse round-trip in both layouts; padded keys follow the cyclic shift."""
    from vitzoo.layers.windows import pad_to_windows, padded_key_mask, window_partition, window_reverse
    x = torch.randn(2, 10, 9, 3)
    xp, pad = pad_to_windows(x, (4, 3))
    assert pad == (2, 0) and xp.shape == (2, 12, 9, 3) and torch.equal(xp[:, :10], x) and not xp[:, 10:].any()
    w = window_partition(xp, (4, 3))
    assert w.shape == (2, 9, 12, 3) and torch.equal(w[0, 1], xp[0, :4, 3:6].reshape(12, 3))
    assert torch.equal(window_reverse(w, (4, 3), (12, 9)), xp)
    assert torch.equal(window_reverse(w.flatten(0, 1), (4, 3), (12, 9)), xp)
    mask = padded_key_mask((10, 9), (4, 3))
    assert mask.shape == (9, 12) and mask[6:].sum() == 3 * 2 * 3 and not mask[:6].any()
    shifted = padded_key_mask((10, 9), (4, 3), (1, 0))
    assert shifted.sum() == mask.sum() and not torch.equal(shifted, mask)


def test_small_window_indexes_the_trained_table():
    """A map smaller than the window attends in one window using the central part of the same table."""
    torch.manual_seed(0)
    big, small = WindowAttention(16, 2, window_size=7).eval(), WindowAttention(16, 2, window_size=5).eval()
    small.qkv.load_state_dict(big.qkv.state_dict())
    small.proj.load_state_dict(big.proj.state_dict())
    table = big.relative_position_bias_table.detach().view(13, 13, 2)[2:11, 2:11].reshape(81, 2)
    small.relative_position_bias_table.data.copy_(table)
    x = torch.randn(2, 1, 25, 16)
    with torch.no_grad():
        torch.testing.assert_close(big(x, (5, 5)), small(x, (5, 5)), atol=1e-6, rtol=0)
        with explicit_attention(big):
            torch.testing.assert_close(big(x, (5, 5)), small(x, (5, 5)), atol=1e-6, rtol=0)


def test_window_and_shift_at_other_resolutions():
    blk = timm.create_model('agent_swin_small', embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)) \
        .layers[2].blocks[1]
    assert (blk.window_size, blk.shift_size) == (7, 3)
    assert blk._window_shift(14, 14) == ((7, 7), (3, 3))
    assert blk._window_shift(16, 6) == ((7, 6), (3, 0))  # clamp the small axis, keep the trained shift on the other
    assert blk._window_shift(5, 4) == ((5, 4), (0, 0))


def test_always_shift_is_the_dense_backbone_rebuild():
    """``always_shift=True`` equals shifting the odd window blocks after construction and rebuilding their masks
    (what the mm backbone did before: same shifts, masks and outputs)."""
    kw = dict(num_classes=10, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
    torch.manual_seed(0)
    model = timm.create_model('agent_swin_small', always_shift=True, **kw).eval()
    torch.manual_seed(0)
    ref = timm.create_model('agent_swin_small', **kw).eval()
    for stage in ref.layers:
        for j, blk in enumerate(stage.blocks):
            if not blk.is_agent and j % 2 == 1 and blk.shift_size == 0:
                blk.shift_size = blk.window_size // 2
                window, shift = blk._window_shift(*blk.input_resolution)
                blk.attn_mask = window_attn_mask(blk.input_resolution, window, shift)
    blocks = [(a, b) for sa, sb in zip(model.layers, ref.layers) for a, b in zip(sa.blocks, sb.blocks)]
    assert [a.shift_size for a, _ in blocks] == [b.shift_size for _, b in blocks] == [0, 3] * 4
    assert ref.layers[3].blocks[1].attn_mask is None  # 7x7 map = window: the classification model does not shift
    assert timm.create_model('agent_swin_small', **kw).layers[3].blocks[1].shift_size == 0
    for a, b in blocks:
        assert (a.attn_mask is None and b.attn_mask is None) or torch.equal(a.attn_mask, b.attn_mask)
    with torch.no_grad():
        for hw in ((224, 224), (448, 448), (320, 256)):
            x = torch.randn(1, 3, *hw)
            assert torch.equal(model(x), ref(x)), hw


@pytest.mark.parametrize('name,size', [
    ('agent_swin_tiny', 224), ('agent_swin_small', 224), ('agent_swin_base_384', 384)])
def test_any_resolution_and_default_unchanged(name, size):
    """Reduced-width copies run at 1.25x and non-square sizes (fused == explicit); the default output is unchanged.

    (128 / 160 px run for every full-size variant in test_models.py.)
    """
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        y0 = model(x)
        for hw in ((size * 5 // 4, size * 5 // 4), (256, 192)):
            xi = torch.randn(1, 3, *hw)
            y = model(xi)
            assert y.shape == (1, 10) and torch.isfinite(y).all(), hw
            with explicit_attention(model):
                torch.testing.assert_close(model(xi), y, atol=1e-5, rtol=1e-5)
        y1 = model(x)
    assert torch.equal(y0, y1)


def test_odd_stage_maps_are_padded_by_the_merging():
    model = timm.create_model('agent_swin_small', num_classes=0, embed_dim=8, depths=(1, 1, 2, 2),
                              num_heads=(1, 2, 2, 4)).eval()
    with torch.no_grad():
        feats = model.forward_intermediates(torch.randn(1, 3, 280, 200), intermediates_only=True)
    assert [tuple(f.shape[-3:]) for f in feats] == [(8, 70, 50), (16, 35, 25), (32, 18, 13), (64, 9, 7)]
    assert all(torch.isfinite(f).all() for f in feats)


def test_bad_attn_type():
    with pytest.raises(ValueError, match='attn_type'):
        timm.create_model('agent_swin_tiny', attn_type='AAXB')
    with pytest.raises(ValueError, match='attn_type'):
        timm.create_model('agent_swin_tiny', attn_type='AAMB')


# name: (params in M, GMACs) measured from the official models
SPEC = {
    'agent_swin_tiny': (28.90, 4.50),
    'agent_swin_small': (49.67, 8.70),
    'agent_swin_small_288': (49.71, 14.53),
    'agent_swin_base': (88.10, 15.40),
    'agent_swin_base_384': (88.31, 46.21),
}


@pytest.mark.parametrize('name', sorted(SPEC))
def test_params_and_flops_match_official(name):
    # On the meta device: the same modules and op shapes as on CPU (the counter sees shapes only), without the
    # seconds of init and compute per full-size model.
    with torch.device('meta'):
        model = timm.create_model(name)
        params, gmacs = SPEC[name]
        assert abs(count_params(model) / 1e6 - params) / params < 0.005
        assert abs(count_macs(model, model.pretrained_cfg['input_size']) / 1e9 - gmacs) / gmacs < 0.01
