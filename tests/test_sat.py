"""SAT: parity with the official implementation (logits, map, loss terms, boxes, IoUs), checkpoints, resolutions."""
import sys

import numpy as np
import pytest
import timm
import torch

import vitzoo  # noqa: F401
from vitzoo.layers.spatial_token import SpatialTokenAttention, gaussian_filter_map, gaussian_kernel
from vitzoo.losses.sat import SATLoss, sat_area_loss, sat_area_ratio, sat_norm_loss, sat_norm_term
from vitzoo.models import CheckpointError
from vitzoo.utils import count_macs, count_params, explicit_attention
from vitzoo.wsol import box_iou, boxes_from_maps, max_iou

from conftest import load_parity, parity_input

REF = 'sat_deit-like.pt'


def _official_checkpoint(ref, path, prefix='module.', legacy=False):
    """The official training checkpoint format: {'model': DataParallel state_dict, 'best_thr', 'epoch'}."""
    sd = {prefix + k: v for k, v in ref['state_dict'].items()}
    torch.save({'model': sd, 'best_thr': 0.4, 'epoch': 29}, path, _use_new_zipfile_serialization=not legacy)
    return str(path)


def _build_from_ref(ref, path, name='sat_deit_tiny', **kw):
    k = ref['official_kwargs']
    assert k['depth'] == 12 and k['patch_size'] == 16  # blocks 9-11 spatial-aware == num_spatial_blocks=3
    return timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=k['num_classes']),
        num_classes=k['num_classes'], embed_dim=k['embed_dim'], num_heads=k['num_heads'], mlp_ratio=k['mlp_ratio'],
        **kw).eval()


@pytest.fixture(scope='module')
def ref():
    return load_parity(REF)


@pytest.fixture(scope='module')
def model_and_outputs(ref, tmp_path_factory):
    path = _official_checkpoint(ref, tmp_path_factory.mktemp('sat') / 'best_loc.pth.tar', legacy=True)
    model = _build_from_ref(ref, path)
    with torch.no_grad():
        logits, loc_map = model.forward_loc(parity_input(ref))
    return model, logits, loc_map


@pytest.mark.parametrize('fused', [True, False])
def test_parity_logits_and_map(ref, model_and_outputs, fused):
    model = model_and_outputs[0]
    x = parity_input(ref)
    with torch.no_grad():
        if fused:
            logits, loc_map = model.forward_loc(x)
            y = model(x)
        else:
            with explicit_attention(model):
                logits, loc_map = model.forward_loc(x)
                y = model(x)
    assert (logits - ref['output']).abs().max().item() <= 1e-5
    assert (y - ref['output']).abs().max().item() <= 1e-5
    assert (logits - ref['output_train_phase']).abs().max().item() <= 1e-5
    assert loc_map.shape == ref['loc_map'].shape == (2, 14, 14)
    assert (loc_map - ref['loc_map']).abs().max().item() <= 1e-5


def test_parity_area_and_norm_terms(ref, model_and_outputs):
    loc_map = model_and_outputs[2]
    assert (sat_area_ratio(loc_map) - ref['area']).abs().max().item() <= 1e-6
    assert (sat_norm_term(loc_map) - ref['norm']).abs().max().item() <= 1e-6
    # (B, 1, h, w) maps are accepted too; the batch losses are the means of the per-image terms
    assert torch.allclose(sat_norm_term(loc_map[:, None]), sat_norm_term(loc_map))
    assert torch.allclose(sat_area_loss(loc_map, 0.25), (ref['area'].mean() - 0.25).abs(), atol=1e-6)
    assert torch.allclose(sat_norm_loss(loc_map), ref['norm'].mean(), atol=1e-6)


def test_parity_boxes_and_ious(ref, model_and_outputs):
    loc_map = model_and_outputs[2]
    thr = ref['postprocess']['threshold']
    boxes = boxes_from_maps(loc_map, thr, ref['postprocess']['crop_size'])
    assert boxes.tolist() == ref['boxes']
    np.testing.assert_allclose(box_iou(boxes, ref['gt_boxes']), np.array(ref['ious']), rtol=0, atol=1e-12)
    best = max_iou(boxes, [np.array([g]) for g in ref['gt_boxes']])  # one GT per image
    np.testing.assert_allclose(best, np.array(ref['max_ious']), rtol=0, atol=1e-12)
    # and with both GT boxes listed for every image: the official max over GT boxes picks the same ones
    np.testing.assert_allclose(max_iou(boxes, [np.array(ref['gt_boxes'])] * 2), np.array(ref['max_ious']), atol=1e-12)


def test_gaussian_kernel_matches_official_weight(ref):
    assert ref['unperturbed_keys'] == ['weight']
    assert torch.allclose(gaussian_kernel(3, 6), ref['state_dict']['weight'], atol=1e-7, rtol=0)
    # zero-padded filter: a unit impulse in the middle reproduces the kernel, one in the corner its truncation
    m = torch.zeros(1, 5, 5)
    m[0, 2, 2] = 1
    assert torch.allclose(gaussian_filter_map(m)[0, 1:4, 1:4], gaussian_kernel()[0, 0])
    m = torch.zeros(1, 5, 5)
    m[0, 0, 0] = 1
    assert torch.allclose(gaussian_filter_map(m)[0, :2, :2], gaussian_kernel()[0, 0, 1:, 1:])


def test_official_checkpoint_formats(ref, tmp_path):
    """Zip format too (legacy: the module fixture), {'model': ...} with 'module.' or a plain state_dict."""
    x = parity_input(ref)
    torch.save(dict(ref['state_dict']), tmp_path / 'c.pth')
    paths = [_official_checkpoint(ref, tmp_path / 'a.pth', legacy=False), str(tmp_path / 'c.pth')]
    for path in paths:
        model = _build_from_ref(ref, path)
        assert 'weight' not in model.state_dict()  # the fixed Gaussian is no model parameter / buffer
        with torch.no_grad():
            assert (model(x) - ref['output']).abs().max().item() <= 1e-5


def test_checkpoint_into_other_resolution(ref, tmp_path):
    """A 224 checkpoint loads into a model built at 320 (pos_embed resized); the map follows the token grid."""
    model = _build_from_ref(ref, _official_checkpoint(ref, tmp_path / 'a.pth'), img_size=320)
    assert model.pos_embed.shape == (1, 401, 48)
    with torch.no_grad():
        logits, loc_map = model.forward_loc(torch.randn(1, 3, 320, 320))
    assert logits.shape == (1, 10) and loc_map.shape == (1, 20, 20)
    assert torch.isfinite(logits).all() and ((loc_map > 0) & (loc_map < 1)).all()


def test_bad_checkpoint_names_key_and_shapes(ref, tmp_path):
    sd = dict(ref['state_dict'])
    sd['blocks.3.attn.qkv.weight'] = torch.zeros(96, 48)
    torch.save({'model': sd}, tmp_path / 'bad.pth')
    msg = r"'blocks\.3\.attn\.qkv\.weight' has shape \(96, 48\).*expects \(144, 48\)"
    with pytest.raises(CheckpointError, match=msg):
        _build_from_ref(ref, str(tmp_path / 'bad.pth'))
    sd = dict(ref['state_dict'])
    del sd['loc_embed']
    torch.save({'model': sd}, tmp_path / 'bad.pth')
    with pytest.raises(CheckpointError, match=r"missing key 'loc_embed' \(expected shape \(1, 1, 48\)\)"):
        _build_from_ref(ref, str(tmp_path / 'bad.pth'))


@pytest.mark.parametrize('deit', ['deit_tiny_patch16_224', 'deit_tiny_distilled_patch16_224'])
def test_init_from_timm_deit(deit, tmp_path):
    """The official initialisation: DeiT backbone weights; spatial token, its embedding and the conv head random."""
    kw = dict(embed_dim=48, depth=3, num_heads=3)
    torch.manual_seed(0)
    src = timm.create_model(deit, **kw).state_dict()
    torch.save(src, tmp_path / 'deit.pth')
    model = timm.create_model('sat_deit_tiny', pretrained=True, num_spatial_blocks=2,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'deit.pth')), **kw).eval()
    sd = model.state_dict()
    for k in ('cls_token', 'patch_embed.proj.weight', 'blocks.2.attn.qkv.weight', 'blocks.1.mlp.fc2.bias',
              'norm.weight'):
        assert torch.equal(sd[k], src[k]), k
    n = 2 if 'distilled' in deit else 1
    assert torch.equal(sd['pos_embed'], torch.cat([src['pos_embed'][:, :1], src['pos_embed'][:, n:]], dim=1))
    assert sd['head.weight'].shape == (1000, 48, 3, 3) and sd['loc_token'].abs().sum() > 0
    with torch.no_grad():
        logits, loc_map = model.forward_loc(torch.randn(1, 3, 96, 96))
    assert logits.shape == (1, 1000) and loc_map.shape == (1, 6, 6)


def test_spatial_attention_fused_equals_explicit_and_gates_values():
    torch.manual_seed(0)
    x = torch.randn(2, 11, 32)
    for spatial in (False, True):
        attn = SpatialTokenAttention(32, num_heads=4, spatial_aware=spatial).eval()
        y_fused, m_fused = attn(x, need_mask=True)
        attn.fused_attn = False
        y_expl, m_expl = attn(x, need_mask=True)
        torch.testing.assert_close(y_fused, y_expl, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m_fused, m_expl, atol=1e-6, rtol=1e-6)
        assert attn(x)[1] is None if not spatial else attn(x)[1] is not None
    # by hand: the mask is sigmoid(head-mean of the last token's logits); spatial = softmax * mask, no renormalisation
    B, N, C, h = 2, 11, 32, 4
    q, k, v = attn.qkv(x).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) * (C // h) ** -0.5
    mask = logits[:, :, -1].mean(1).sigmoid()
    out = ((logits.softmax(-1) * mask[:, None, None]) @ v).transpose(1, 2).reshape(B, N, C)
    torch.testing.assert_close(attn(x)[0], attn.proj(out), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn(x)[1], mask)


def test_any_resolution_loc_map_and_224_unchanged():
    model = timm.create_model('sat_deit_tiny', num_classes=5, embed_dim=48, depth=4, num_heads=2).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        y0, m0 = model.forward_loc(x)
        y_rect, m_rect = model.forward_loc(torch.randn(2, 3, 96, 128))
        y1, m1, masks = model.forward_loc(x, return_masks=True)
    assert m0.shape == (1, 14, 14) and m_rect.shape == (2, 6, 8) and y_rect.shape == (2, 5)
    assert torch.equal(y0, y1) and torch.equal(m0, m1)
    assert len(masks) == 4 and all(m.shape == (1, 14, 14) for m in masks)
    assert model.spatial_blocks == (1, 2, 3)
    torch.testing.assert_close(m0, torch.stack(masks[1:]).mean(0))  # the map = mean of the spatial blocks' masks


def test_num_spatial_blocks_out_of_range():
    with pytest.raises(ValueError, match='num_spatial_blocks must be in'):
        timm.create_model('sat_deit_tiny', depth=3, num_spatial_blocks=4)


def test_sat_loss_trains_every_parameter():
    torch.manual_seed(0)
    model = timm.create_model('sat_deit_tiny', num_classes=4, embed_dim=32, depth=3, num_heads=2, patch_size=8).train()
    crit = SATLoss(area_thr=0.25)
    assert all(p.requires_grad for p in model.parameters())
    loss, terms = crit(model.forward_loc(torch.randn(3, 3, 32, 48)), torch.tensor([0, 1, 3]), return_terms=True)
    loss.backward()
    assert torch.isclose(loss, terms['cls'] + terms['area'] + terms['norm'])
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert 'kernel' not in crit.state_dict()  # non-persistent buffer
    with pytest.raises(TypeError, match='forward_loc'):
        crit(torch.randn(2, 4), torch.tensor([0, 1]))


def test_sat_loss_weights_and_terms_by_hand():
    loc = torch.full((2, 4, 4), 0.5)
    loc[1] = 1.0  # batch mean 0.75 -> area loss |0.75 - 0.35| = 0.4
    logits, target = torch.zeros(2, 3), torch.tensor([0, 2])  # CE = log 3
    total, t = SATLoss(area_thr=0.35, area_weight=2.0, norm_weight=0.5)((logits, loc), target, return_terms=True)
    assert torch.isclose(t['area'], torch.tensor(0.4))
    assert torch.isclose(t['cls'], torch.log(torch.tensor(3.0)))
    # the norm term on the Gaussian-filtered map, computed independently with conv2d
    f = torch.nn.functional.conv2d(loc[:, None], gaussian_kernel(), padding=1)
    assert torch.isclose(t['norm'], (f * (1 - f)).mean())
    assert torch.isclose(total, t['cls'] + 2.0 * t['area'] + 0.5 * t['norm'])


def test_timm_interface():
    model = timm.create_model('sat_deit_tiny', num_classes=6, embed_dim=32, depth=4, num_heads=2).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (1, 32, 4, 6)
        assert model.forward_head(feats, pre_logits=True).shape == (1, 32)
        final, inter = model.forward_intermediates(x, indices=2, return_prefix_tokens=True)
        torch.testing.assert_close(final, feats)
        assert len(inter) == 2 and inter[0][0].shape == (1, 32, 4, 6) and inter[0][1].shape == (1, 2, 32)
    assert {'loc_token', 'loc_embed', 'cls_token', 'pos_embed'} == model.no_weight_decay()
    assert model.pretrained_cfg['crop_mode'] == 'squash' and model.pretrained_cfg['crop_pct'] == 0.875
    model.reset_classifier(0, '')
    with torch.no_grad():
        assert model(x).shape == (1, 32, 4, 6)


@pytest.mark.parametrize('name,dim,macs', [('sat_deit_tiny', 192, True), ('sat_deit_small', 384, True),
                                           ('sat_deit_base', 768, False)])
def test_params_and_flops_by_hand(name, dim, macs):
    """Parameter count and MACs at 224 (200 classes, the CUB head) by hand."""
    nc, N, P, C = 200, 198, 196, dim
    model = timm.create_model(name, num_classes=nc)
    block_params = 4 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    params = (3 * 256 * C + C) + 3 * C + 197 * C + 12 * block_params + 2 * C + (9 * C * nc + nc)
    assert count_params(model) == params
    if macs:
        block = N * C * 3 * C + 2 * N * N * C + N * C * C + 2 * N * C * 4 * C
        assert count_macs(model) == P * 3 * 256 * C + 12 * block + P * C * nc * 9


@pytest.mark.parametrize('size', ['tiny', 'small', 'base'])
def test_deit_init_tags_point_at_timms_deit_weights(size):
    """``sat_deit_<size>.fb_in1k`` is the official training's initialisation: FB's DeiT file / timm's hub copy."""
    ours = timm.models.get_pretrained_cfg(f'sat_deit_{size}.fb_in1k')
    deit = timm.models.get_pretrained_cfg(f'deit_{size}_patch16_224.fb_in1k')
    assert ours.hf_hub_id == deit.hf_hub_id == f'timm/deit_{size}_patch16_224.fb_in1k'
    assert ours.url == deit.url and ours.url.startswith('https://dl.fbaipublicfiles.com/deit/')
    # SAT's own evaluation transform, and the bare name still means SAT's own weights
    assert (ours.crop_mode, ours.crop_pct, ours.interpolation) == ('squash', 0.875, 'bilinear')
    assert timm.models.get_pretrained_cfg(f'sat_deit_{size}').tag == 'in1k'


def test_deit_init_tag_loads_the_hub_deit_checkpoint(tmp_path, monkeypatch):
    """``create_model('sat_deit_small.fb_in1k', pretrained=True, num_classes=200)`` (the CUB recipe) fetches timm's
    DeiT-S hub file and maps it: backbone from DeiT, spatial token / its embedding / conv head at their init."""
    from safetensors.torch import save_file
    import vitzoo.weights as vw
    torch.manual_seed(0)
    src = timm.create_model('deit_small_patch16_224').state_dict()  # timm's real key names (random values)
    save_file(src, str(tmp_path / 'model.safetensors'))
    fetched = []

    def fake_hub(hub_id, filename, key, entry, cache_dir):  # no network here: serve the file the hub would
        fetched.append((hub_id, key))
        return tmp_path / 'model.safetensors', set()
    # the hub download sits next to the builder (a private module: reached through the public function's module)
    monkeypatch.setattr(sys.modules[vw.build_model_with_cfg.__module__], '_fetch_hub', fake_hub)
    torch.manual_seed(1)
    model = timm.create_model('sat_deit_small.fb_in1k', pretrained=True, num_classes=200, drop_path_rate=0.1)
    assert fetched == [('timm/deit_small_patch16_224.fb_in1k', 'sat_deit_small.fb_in1k')]
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in src.items() if not k.startswith('head.')), 'backbone not loaded'
    assert sd['head.weight'].shape == (200, 384, 3, 3)
    torch.manual_seed(1)
    fresh = timm.create_model('sat_deit_small', num_classes=200).state_dict()
    for k in ('loc_token', 'loc_embed', 'head.weight', 'head.bias'):
        assert torch.equal(sd[k], fresh[k]), k  # the model's own init, untouched by the DeiT file
    assert not torch.equal(sd['cls_token'], fresh['cls_token'])


@pytest.mark.parametrize('shape,kernel,padding', [((2, 16, 14, 14), 3, 1), ((2, 8, 7, 9), 3, 0), ((1, 4, 5, 5), 1, 0),
                                                  ((2, 6, 6, 4), 5, 2)])
def test_conv2d_mean_is_conv_then_mean(shape, kernel, padding):
    from vitzoo.layers.pooled_conv import conv2d_mean
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, shape[1], kernel, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.functional.conv2d(x, w, b, padding=padding).mean(dim=(2, 3))
    out = conv2d_mean(x, w, b, (padding, padding))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r'does not fit kernel \(7, 3, 3, 3\)'):
        conv2d_mean(torch.randn(1, 2, 4, 4), torch.randn(7, 3, 3, 3))


def test_head_logits_skip_the_class_maps_unless_hooked():
    """The pooled logits never run the conv over the map (1/200 of its FLOPs); a forward hook on the head, or
    global_pool='' (the class maps), gets the conv itself; all give the same values."""
    model = timm.create_model('sat_deit_tiny', num_classes=10, embed_dim=32, depth=4, num_heads=2).eval()
    feats = torch.randn(2, 32, 4, 6)
    calls = []
    with torch.no_grad():
        fast = model.forward_head(feats)
        h = model.head.register_forward_hook(lambda m, i, o: calls.append(o.shape))
        hooked = model.forward_head(feats)
        h.remove()
        maps = model.head(feats)
        model.forward_head(feats)
    assert calls == [(2, 10, 4, 6)]  # the hooked call only
    torch.testing.assert_close(fast, maps.mean(dim=(2, 3)), rtol=0, atol=1e-6)
    torch.testing.assert_close(hooked, maps.mean(dim=(2, 3)), rtol=0, atol=1e-6)
    model.reset_classifier(10, '')
    assert model.forward_head(feats).shape == (2, 10, 4, 6)
