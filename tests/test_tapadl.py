"""TAP + ADL: the TAP layer, the ADL loss, parity of TAP-FAN / TAP-RVT with the official code, checkpoints, sizes,
resolutions, and a short training run where ADL decreases."""
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import vitzoo  # noqa: F401
from vitzoo.data.shapes import ShapesDataset
from vitzoo.layers.token_pooling import (
    DilatedAvgPooling, DilationPredictor, TokenAwarePooling, dilated_avg_pool, token_aware_pool)
from vitzoo.losses.adl import AttentionDiversificationLoss, attention_diversification_loss
from vitzoo.models import CheckpointError
from vitzoo.models.fan import LayerNorm2dUnbiased
from vitzoo.utils import count_params, explicit_attention

from conftest import load_parity, parity_input

FAN_REF = 'tap_fan_hybrid-like.pt'
RVT_REF = 'tap_rvt-like.pt'


def _fan_kwargs(ref):
    k = ref['official_kwargs']
    b = k['backbone']['kwargs']
    return dict(num_classes=k['num_classes'], embed_dim=k['embed_dim'], depth=k['depth'], num_heads=k['num_heads'],
                backbone_depths=b['depths'], backbone_dims=b['dims'], num_scales=k['num_scales'])


def _rvt_kwargs(ref):
    k = ref['official_kwargs']
    return dict(num_classes=k['num_classes'], base_dims=k['base_dims'], depth=k['depth'], heads=k['heads'],
                masked_block=k['masked_block'], num_scales=k['num_scales'])


def _build(ref_name, path, **kw):
    ref = load_parity(ref_name)
    if ref_name == FAN_REF:
        name, args = 'tap_fan_base_16_p4_hybrid', _fan_kwargs(ref)
    else:
        name, args = 'tap_rvt_base_plus', _rvt_kwargs(ref)
    args.update(kw)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=10),
                             **args).eval()


# ---------------------------------------------------------------- TAP layer

@pytest.mark.parametrize('d', [1, 2, 3])
def test_dilated_pool_is_unfold_mean_over_9(d):
    """Equals the original formulation (unfold with zero padding d, mean over the 9 taps) on a non-square grid."""
    x = torch.randn(2, 5, 9, 13, dtype=torch.float64)
    ref = F.unfold(x, 3, dilation=d, padding=d).reshape(2, 5, 9, 9, 13).mean(2)
    torch.testing.assert_close(dilated_avg_pool(x, d), ref, rtol=0, atol=1e-12)
    assert torch.equal(dilated_avg_pool(x, 0), x)


def test_dilated_pool_divides_border_by_9():
    y = DilatedAvgPooling(1)(torch.ones(1, 1, 4, 5))
    assert y[0, 0, 0, 0].item() == pytest.approx(4 / 9)  # corner: 4 taps inside
    assert y[0, 0, 0, 2].item() == pytest.approx(6 / 9)  # edge: 6 taps
    assert y[0, 0, 1, 1].item() == pytest.approx(1.0)
    y3 = DilatedAvgPooling(3)(torch.ones(1, 1, 4, 5))
    assert y3[0, 0, 0, 0].item() == pytest.approx(4 / 9)  # taps at +-3 only reach inside on one side


def test_token_aware_pool_mixes_the_selected_scale():
    torch.manual_seed(0)
    x = torch.randn(2, 6 * 7, 8)
    pred = DilationPredictor(8, 4).eval()
    y, w = token_aware_pool(x, (6, 7), pred, [0, 1, 2, 3])
    assert w.shape == (2, 4, 6, 7)
    torch.testing.assert_close(w.sum(1), torch.ones(2, 6, 7))
    grid = x.transpose(1, 2).reshape(2, 8, 6, 7)
    expected = sum(w[:, k:k + 1] * dilated_avg_pool(grid, k) for k in range(4))
    torch.testing.assert_close(y, expected.flatten(2).transpose(1, 2))
    for k in range(4):  # a one-hot predictor picks exactly one pool
        one_hot = lambda g, k=k: F.one_hot(torch.full(g.shape[:1] + g.shape[2:], k), 4).permute(0, 3, 1, 2).float()
        yk, _ = token_aware_pool(x, (6, 7), one_hot, [0, 1, 2, 3])
        torch.testing.assert_close(yk, dilated_avg_pool(grid, k).flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match='42 tokens do not form the 6x6 grid'):
        token_aware_pool(x, (6, 6), pred, [0, 1, 2, 3])


def test_tap_module_keys_and_pred_scale():
    tap = TokenAwarePooling(16, num_scales=4)
    assert sorted(tap.state_dict()) == [
        'dilation_predictor.proj.0.weight', 'dilation_predictor.proj.1.bias',
        'dilation_predictor.proj.1.num_batches_tracked',
        'dilation_predictor.proj.1.running_mean', 'dilation_predictor.proj.1.running_var',
        'dilation_predictor.proj.1.weight', 'dilation_predictor.proj.2.weight']
    y = tap(torch.randn(3, 20, 16), (4, 5))
    assert y.shape == (3, 20, 16) and tap.pred_scale.shape == (3, 4, 4, 5)


def test_unbiased_layernorm2d_matches_var_mean_formula():
    torch.manual_seed(0)
    ln = LayerNorm2dUnbiased(7)
    ln.weight.data.uniform_(0.5, 1.5)
    ln.bias.data.normal_()
    x = torch.randn(2, 7, 3, 4) * 3 + 1
    var, mean = torch.var_mean(x, dim=1, keepdim=True)  # unbiased, as the original's fallback path
    expected = (x - mean) * torch.rsqrt(var + ln.eps) * ln.weight[:, None, None] + ln.bias[:, None, None]
    torch.testing.assert_close(ln(x), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- ADL

def _per_sample_adl(attn, b, threshold=2.0):
    """Hand computation for sample b: explicit loops over layers and query rows."""
    total = 0.0
    for a in attn:
        m = a[b].double().mean(0)
        n = m.shape[-1]
        s = m.mean(0)
        s = torch.where(s > threshold / n, s, torch.zeros_like(s))
        sims = []
        for i in range(n):
            r = torch.where(m[i] > threshold / n, m[i], torch.zeros_like(m[i]))
            sims.append((r @ s) / max((r.norm() * s.norm()).item(), 1e-12) if r.norm() > 0 and s.norm() > 0 else 0.)
        total += float(sum(sims)) / n
    return total / (len(attn) + 1e-6)


def _random_maps(B=2, heads=3, n=25, layers=2, sharp=1.0):
    """Maps with a per-sample set of popular keys, so the mean row has entries above 2/N."""
    torch.manual_seed(1)
    return [(torch.randn(B, heads, n, n) * sharp + torch.randn(B, 1, 1, n) * 2).softmax(-1) for _ in range(layers)]


def test_adl_batch_one_equals_per_sample_value_at_batch_two():
    attn = _random_maps()
    per_sample = [_per_sample_adl(attn, b) for b in range(2)]
    assert abs(per_sample[0] - per_sample[1]) > 1e-3  # the samples differ, so the check below can fail
    for b in range(2):
        one = attention_diversification_loss([a[b:b + 1] for a in attn])
        assert abs(one.item() - per_sample[b]) <= 1e-5
    both = attention_diversification_loss(attn)
    assert abs(both.item() - sum(per_sample) / 2) <= 1e-5


def test_adl_batch_one_through_the_model():
    """Eval-mode TAP-RVT: ADL of each sample alone equals its share of the batch-2 value."""
    ref = load_parity(RVT_REF)
    model = timm.create_model('tap_rvt_base_plus', **_rvt_kwargs(ref)).eval()
    model.load_state_dict(vitzoo.models.rvt.checkpoint_filter_fn(ref['state_dict'], model))
    x = parity_input(ref)
    with torch.no_grad():
        _, attn = model(x, return_attn=True)
        singles = [attention_diversification_loss(model(x[b:b + 1], return_attn=True)[1]).item() for b in range(2)]
    for b in range(2):
        assert abs(singles[b] - _per_sample_adl(attn, b)) <= 1e-5
    assert abs(sum(singles) / 2 - ref['adl'].item()) <= 1e-5


def test_adl_weight_threshold_and_errors():
    attn = _random_maps(sharp=0.5)
    base = attention_diversification_loss(attn, threshold=2.0)
    assert AttentionDiversificationLoss(weight=0.5, threshold=2.0)(attn).item() == pytest.approx(0.5 * base.item())
    no_th = attention_diversification_loss(attn, threshold=0.0)
    assert abs(no_th.item() - _per_sample_adl(attn, 0, 0.0) / 2 - _per_sample_adl(attn, 1, 0.0) / 2) <= 1e-5
    assert no_th.item() != pytest.approx(base.item())
    uniform = [torch.full((2, 2, 9, 9), 1 / 9)]
    assert attention_diversification_loss(uniform).item() == 0.0  # nothing above 2/N
    with pytest.raises(ValueError, match='at least one'):
        attention_diversification_loss([])
    with pytest.raises(ValueError, match=r'\(B, heads, N, N\)'):
        attention_diversification_loss([torch.rand(2, 9, 9)])


# ---------------------------------------------------------------- parity with the official code

@pytest.mark.parametrize('ref_name', [FAN_REF, RVT_REF])
@pytest.mark.parametrize('fused', [True, False])
def test_parity_with_official(ref_name, fused, official_file):
    ref = load_parity(ref_name)
    model = _build(ref_name, official_file(ref['state_dict']))
    x = parity_input(ref)
    with torch.no_grad():
        if fused:
            y = model(x)
            y_attn, attn = model(x, return_attn=True)
        else:
            with explicit_attention(model):
                y = model(x)
                y_attn, attn = model(x, return_attn=True)
    assert (y - ref['output']).abs().max().item() <= 1e-5
    assert (y_attn - ref['output']).abs().max().item() <= 1e-5
    assert [list(a.shape) for a in attn] == ref['attn_full_shapes']
    for a, r in zip(attn, ref['attn']):
        assert (a[ref['attn_batch_index']] - r).abs().max().item() <= 1e-5
    adl = attention_diversification_loss(attn, threshold=ref['adl_threshold'])
    assert abs(adl.item() - ref['adl'].item()) <= 1e-5


def _count_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(F, 'scaled_dot_product_attention', counting)
    return calls


def test_maps_only_materialised_on_request(monkeypatch):
    calls = _count_sdpa(monkeypatch)
    fan = timm.create_model('tap_fan_tiny_12_p16_224', embed_dim=32, depth=3, num_heads=2, num_classes=4).eval()
    rvt = timm.create_model('tap_rvt_small_plus', base_dims=[16], depth=[3], heads=[2], masked_block=1,
                            num_classes=4).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fan(x)
        assert len(calls) == 3 + 2  # every FAN block and both (timm) class-attention blocks are fused
        calls.clear()
        assert len(fan(x, return_attn=True)[1]) == 3
        assert len(calls) == 2  # only the class-attention blocks
        calls.clear()
        rvt(x)
        assert len(calls) == 2  # the unmasked blocks; the masked one needs the explicit logit product
        calls.clear()
        assert len(rvt(x, return_attn=True)[1]) == 3 and not calls


def test_fused_equals_explicit_in_training_mode():
    torch.manual_seed(0)
    for name, kw in [('tap_fan_tiny_8_p4_hybrid', dict(embed_dim=32, depth=2, num_heads=2, backbone_depths=[1, 1],
                                                        backbone_dims=[16, 32])),
                     ('tap_rvt_tiny', dict(base_dims=[16, 16], depth=[1, 1], heads=[2, 4]))]:
        model = timm.create_model(name, num_classes=5, **kw).train()
        x = torch.randn(2, 3, 96, 128)
        y0 = model(x)
        with explicit_attention(model):
            y1 = model(x)
        torch.testing.assert_close(y0, y1, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- checkpoints

@pytest.mark.parametrize('ref_name', [FAN_REF, RVT_REF])
def test_official_checkpoint_variants_load(ref_name, official_file):
    """'module.' prefixes and 'state_dict' / 'state_dict_ema' nesting load to the same outputs."""
    ref = load_parity(ref_name)
    x = parity_input(ref)
    sd = {'module.' + k: v for k, v in ref['state_dict'].items()}
    for path in (official_file(sd, wrap='state_dict'), official_file(ref['state_dict'], wrap='state_dict_ema')):
        with torch.no_grad():
            y = _build(ref_name, path)(x)
        assert (y - ref['output']).abs().max().item() <= 1e-5


def test_bad_checkpoints_name_key_and_shapes(official_file):
    ref = load_parity(FAN_REF)
    sd = dict(ref['state_dict'])
    sd['blocks.1.attn.kv.weight'] = torch.zeros(32, 32)
    msg = r"'blocks\.1\.attn\.kv\.weight' has shape \(32, 32\).*expects \(64, 32\)"
    with pytest.raises(CheckpointError, match=msg):
        _build(FAN_REF, official_file(sd))
    with pytest.raises(CheckpointError, match='build a tap_fan_\\* model'):
        _build(FAN_REF, official_file(ref['state_dict']), num_scales=0)
    ref = load_parity(RVT_REF)
    sd = dict(ref['state_dict'])
    del sd['transformers.0.blocks.1.dilation_predictor.proj.1.running_var']
    with pytest.raises(CheckpointError, match=r"missing key 'blocks\.1\.dilation_predictor\.proj\.1\.running_var'"):
        _build(RVT_REF, official_file(sd))


def test_rvt_checkpoint_into_other_resolution(official_file):
    """A 224 checkpoint loads into a model built at 288: att_mask is resized to the 18x18 grid."""
    ref = load_parity(RVT_REF)
    model = _build(RVT_REF, official_file(ref['state_dict']), img_size=288)
    assert model.blocks[0].attn.att_mask.shape == (2, 324, 324)
    with torch.no_grad():
        y = model(F.interpolate(parity_input(ref), size=288))
    assert torch.isfinite(y).all()


# ---------------------------------------------------------------- resolutions

def test_any_resolution_non_square():
    fan = timm.create_model('tap_fan_tiny_8_p4_hybrid', embed_dim=32, depth=2, num_heads=2, backbone_depths=[1, 1],
                            backbone_dims=[16, 32], num_classes=3).eval()
    rvt = timm.create_model('tap_rvt_tiny_plus', base_dims=[16, 16], depth=[2, 1], heads=[2, 4], masked_block=2,
                            num_classes=3).eval()
    x = torch.randn(2, 3, 160, 224)
    with torch.no_grad():
        y, attn = fan(x, return_attn=True)
        assert y.shape == (2, 3) and attn[0].shape == (2, 2, 140, 140)
        assert fan.blocks[0].pred_scale.shape == (2, 4, 10, 14)
        y, attn = rvt(x, return_attn=True)
        assert y.shape == (2, 3) and [a.shape[-1] for a in attn] == [140, 140, 35]


def test_dense_intermediates_and_attention_recording():
    """FAN's dense maps (stem, a block, class attention) and record_attention(), the API the TAP-FAN backbone uses."""
    fan = timm.create_model('tap_fan_tiny_8_p4_hybrid', embed_dim=32, depth=2, num_heads=2, backbone_depths=[1, 1],
                            backbone_dims=[16, 32]).eval()
    rvt = timm.create_model('tap_rvt_tiny', base_dims=[16, 16], depth=[2, 1], heads=[2, 4]).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for m in (fan, rvt):
            logits, attn = m(x, return_attn=True)
            with m.record_attention():
                assert m.recording_attention
                assert torch.equal(m(x), logits)
            assert not m.recording_attention
            rec = m.pop_attention()
            assert len(rec) == len(attn) and all(torch.equal(a, b) for a, b in zip(rec, attn))
            with pytest.raises(RuntimeError, match='record_attention'):
                m.pop_attention()  # consumed
        maps = fan.forward_intermediates(x, indices=[0], intermediates_only=True, stem=True, cls_attn=True)
        final, _ = fan.forward_intermediates(x, indices=[0], cls_attn=True)
        assert torch.equal(final, fan.forward_features(x))
    assert [tuple(f.shape) for f in maps] == [(1, 16, 16, 24), (1, 32, 8, 12), (1, 32, 4, 6), (1, 32, 4, 6)]
    with pytest.raises(ValueError, match='hybrid'):
        timm.create_model('tap_fan_tiny_12_p16_224', depth=1).forward_intermediates(x, stem=True)


def test_rvt_att_mask_is_unchanged_at_construction_grid():
    from vitzoo.models.rvt import resize_att_mask
    m = torch.randn(2, 49, 49)
    assert resize_att_mask(m, (7, 7), (7, 7)) is m
    const = torch.full((2, 49, 49), 0.3)
    torch.testing.assert_close(resize_att_mask(const, (7, 7), (5, 6)), torch.full((2, 30, 30), 0.3))


def test_fan_width_change_downsamples():
    """The X-large layout (a width change inserts a stride-2 downsample): maps of both grids reach ADL."""
    model = timm.create_model('tap_fan_xlarge_16_p4_hybrid', embed_dim=16, depth=3, num_heads=[2, 2, 4],
                              channel_dims=[16, 16, 32], backbone_depths=[1, 1], backbone_dims=[8, 16],
                              num_classes=4).eval()
    with torch.no_grad():
        y, attn = model(torch.randn(2, 3, 128, 160), return_attn=True)
    assert y.shape == (2, 4) and [a.shape for a in attn] == [(2, 2, 80, 80), (2, 2, 80, 80), (2, 4, 20, 20)]
    assert model.feature_info[1]['reduction'] == 32 and model.feature_info[1]['num_chs'] == 32
    assert torch.isfinite(attention_diversification_loss(attn))


# ---------------------------------------------------------------- sizes

def test_params_match_official_code():
    fan = count_params(timm.create_model('tap_fan_base_16_p4_hybrid'))
    rvt = count_params(timm.create_model('tap_rvt_base_plus'))
    assert abs(fan / 1e6 - 50.7) < 0.05  # README 50.7M
    assert abs(rvt / 1e6 - 89.40) < 0.005  # what the released code builds (README: 92.1M)
    # TAP overhead per block (spec, derived): 9*C*K + 2K + 9*K^2 with C = 768, K = 4, 12 blocks
    plain = count_params(timm.create_model('rvt_base_plus'))
    assert rvt - plain == 12 * (9 * 768 * 4 + 2 * 4 + 9 * 16)


# ---------------------------------------------------------------- training

def test_adl_decreases_in_short_training():
    """Same init, same batch, same steps: with ADL in the loss the ADL term drops below the ADL-off run's.

    Starts from the sharpened parity weights (with a random init every head-mean entry is below 2/N and ADL is 0).
    A fixed batch keeps the two runs paired, so the gap is the ADL gradient's doing.
    """
    ref = load_parity(RVT_REF)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    to_tensor = lambda im: (torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255 - mean) / std
    ds = ShapesDataset(num_samples=8, img_size=64, transform=to_tensor)
    x = torch.stack([ds[i][0] for i in range(8)])
    t = torch.tensor([ds[i][1] for i in range(8)])

    def run(adl_weight):
        torch.manual_seed(0)
        model = timm.create_model('tap_rvt_base_plus', **_rvt_kwargs(ref))
        model.load_state_dict(vitzoo.models.rvt.checkpoint_filter_fn(ref['state_dict'], model))
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
        adl_loss = AttentionDiversificationLoss(weight=adl_weight, threshold=2)
        values = []
        for _ in range(6):
            logits, attn = model(x, return_attn=True)
            loss = F.cross_entropy(logits, t) + adl_loss(attn)
            opt.zero_grad()
            loss.backward()
            opt.step()
            values.append(attention_diversification_loss(attn, threshold=2).item())
        return values

    on, off = run(1.0), run(0.0)
    assert on[0] == pytest.approx(off[0])  # same start
    assert sum(on[1:]) / 5 < sum(off[1:]) / 5 - 0.01
    assert on[-1] < on[0] - 0.1


# ---------------------------------------------------------------- patch-wise augmentation (official --use_patch_aug)

_MEAN, _STD = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def _images(n: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """Normalised random images with pixels in [0.1, 0.9] (the [0, 1] clamp never bites on 0.01 noise)."""
    g = torch.Generator().manual_seed(seed)
    return (0.1 + 0.8 * torch.rand(n, 3, size, size, generator=g) - _MEAN) / _STD


def _aug(**p):
    from vitzoo.data.patch_aug import PatchLevelAug
    return PatchLevelAug(16, **dict(dict(crop_p=0.0, noise_p=0.0, flip_p=0.0), **p))


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per patch: whether it differs."""
    from vitzoo.data.patch_aug import to_patches
    return (to_patches(a, 16) != to_patches(b, 16)).flatten(1).any(1)


def test_patch_aug_layout_is_the_official_unfold_fold():
    """TAPADL_RVT/engine.py patch_level_aug: unfold -> permute(0,2,3,1,4,5) -> patches, F.fold back, clamp."""
    from vitzoo.data.patch_aug import PatchLevelAug, from_patches, to_patches
    x = torch.randn(2, 3, 64, 48)
    ps = 16
    official = x.unfold(2, ps, ps).unfold(3, ps, ps).permute(0, 2, 3, 1, 4, 5).contiguous().reshape(-1, 3, ps, ps)
    assert torch.equal(to_patches(x, ps), official)
    folded = F.fold(official.reshape(2, -1, 3, ps, ps).permute(0, 2, 3, 4, 1).reshape(2, 3 * ps * ps, -1), (64, 48),
                    ps, stride=ps)
    assert torch.equal(from_patches(official, 2, 64, 48), folded)
    # every op off: the images come back clamped to the normalised [0, 1] limits and otherwise unchanged
    out = PatchLevelAug(16, crop_p=0.0, noise_p=0.0, flip_p=0.0)(x * 3)
    assert torch.equal(out, torch.max(torch.min(x * 3, (1 - _MEAN) / _STD), (0 - _MEAN) / _STD))
    assert (x * 3 != out).any()


def test_patch_aug_changes_about_ten_percent_per_op():
    x = _images(16)  # 3136 patches
    torch.manual_seed(0)
    for op in ('noise_p', 'flip_p'):  # per patch (kornia's element probability)
        frac = _changed(_aug(**{op: 0.1})(x), x).float().mean().item()
        assert 0.08 <= frac <= 0.12, (op, frac)
    # the crop: kornia's batch probability (p_batch) -> one call in ten crops every patch
    small, crop = _images(1, 64), _aug(crop_p=0.1)
    calls = torch.stack([_changed(crop(small), small) for _ in range(300)])  # (calls, 16 patches)
    applied = calls.any(1)
    assert 0.05 <= applied.float().mean().item() <= 0.15
    assert calls[applied].float().mean().item() >= 0.99  # kornia 0.6.11 never draws a full-size (identity) crop
    # all three with the official defaults: shape, limits, repeatable under a seed
    from vitzoo.data.patch_aug import PatchLevelAug
    aug = PatchLevelAug(16)
    torch.manual_seed(3)
    a = aug(x)
    torch.manual_seed(3)
    b = aug(x)
    torch.manual_seed(4)
    c = aug(x)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert ((a >= (0 - _MEAN) / _STD) & (a <= (1 - _MEAN) / _STD)).all()
    for out in (a, c):  # a cropping call changes every patch, else noise or flip ~1 - 0.9 ** 2 of them
        frac = _changed(out, x).float().mean().item()
        assert frac >= 0.99 or 0.15 < frac < 0.23, frac


def test_patch_aug_each_op_does_what_it_says():
    from vitzoo.data.patch_aug import PatchResizedCrop, to_patches
    x = _images(16)
    px = to_patches(x, 16)
    torch.manual_seed(1)
    out = _aug(noise_p=0.1)(x)
    d = to_patches(out, 16) - px
    hit = d.flatten(1).ne(0).any(1)
    assert d[~hit].abs().max() == 0
    assert d[hit].std().item() == pytest.approx(0.01, rel=0.02) and abs(d[hit].mean().item()) < 5e-4
    out = _aug(flip_p=0.1)(x)
    po = to_patches(out, 16)
    hit = _changed(out, x)
    assert hit.any() and torch.equal(po[hit], px[hit].flip(-1)) and torch.equal(po[~hit], px[~hit])
    # crop: each patch is a bilinear (align_corners) resize of a strictly smaller square window of itself
    x = _images(2, 32)
    px, po = to_patches(x, 16), to_patches(_aug(crop_p=1.0)(x), 16)
    sides = []
    for p, o in zip(px, po):
        found = [s for s in range(8, 16) for i in range(17 - s) for j in range(17 - s) if torch.allclose(
            F.interpolate(p[None, :, i:i + s, j:j + s], (16, 16), mode='bilinear', align_corners=True)[0], o,
            atol=1e-6, rtol=0)]
        assert found, 'a cropped patch is no resized window of its patch'
        sides.append(found[0])
    assert set(sides) == {15}  # round(16 * sqrt(scale)), scale in [0.85, 1), a full-size draw rejected
    # the grouped crop / resize equals kornia's per-patch crop_by_indices (RandomResizedCrop's 'slice' mode)
    import kornia
    patches = torch.rand(300, 3, 16, 16)
    crop = PatchResizedCrop(scale=(0.3, 1.0), ratio=(0.5, 2.0))
    boxes = crop.sample(300, 16, 16)
    assert len(torch.unique(boxes[:, 2:], dim=0)) > 5
    y0, x0, h, w = boxes.T
    src = torch.stack([torch.stack(c, 1) for c in ((x0, y0), (x0 + w - 1, y0), (x0 + w - 1, y0 + h - 1),
                                                   (x0, y0 + h - 1))], 1).float()
    ref = kornia.geometry.transform.crop_by_indices(patches, src, size=(16, 16), interpolation='bilinear',
                                                    align_corners=True)
    assert torch.equal(crop.crop_resize(patches, boxes), ref)


def test_patch_aug_uses_the_models_patch_size():
    """The official code hard-codes 16 (224 px) / 4 (32 px); here the model's patch size, at any multiple of it."""
    from vitzoo.data.patch_aug import PatchLevelAug, model_patch_size
    assert model_patch_size(timm.create_model('tap_rvt_tiny', num_classes=4, img_size=32, base_dims=[16], depth=[2],
                                              heads=[2])) == 16
    assert model_patch_size(timm.create_model('tap_fan_tiny_12_p16_224', embed_dim=32, depth=1, num_heads=2,
                                              patch_size=8)) == 8
    assert model_patch_size(timm.create_model('vit_tiny_patch16_224', depth=1)) == 16
    with pytest.raises(ValueError, match='ResNet has no patch size'):
        model_patch_size(timm.create_model('resnet18'))
    x = _images(2, 40)[..., :24]  # 40 x 24: 8-px patches
    torch.manual_seed(0)
    out = PatchLevelAug(8, flip_p=1.0, noise_p=0.0, crop_p=0.0)(x)
    assert torch.equal(out, x.reshape(2, 3, 5, 8, 3, 8).flip(-1).reshape(2, 3, 40, 24))  # every 8x8 patch flipped
    with pytest.raises(ValueError, match='the input 40x24 is not a multiple of the patch size 16'):
        PatchLevelAug(16)(x)
