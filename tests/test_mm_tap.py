"""TAP-FAN in mmseg 1.x: the ``TAPFAN`` backbone, ``ADLEncoderDecoder``'s ``loss_ad``, the official SegFormer MLP
head (``SegFormerMLPHead``), the SegFormer demo end to end.

CPU only, reduced FAN hybrids (1-2 FAN blocks, one block per ConvNeXt stage), 64-96 px inputs.
"""
import math
import os.path as osp

import pytest
import torch
import torch.nn.functional as F

import mmengine  # noqa: E402,F401  (the det/seg extras are part of `make test`: a missing install must fail, not skip)

import timm  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

import vitzoo.mmseg  # noqa: E402,F401
from vitzoo.mm import TAPFAN  # noqa: E402
from vitzoo.losses.adl import attention_diversification_loss  # noqa: E402
from vitzoo.models import CheckpointError  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO = osp.join(ROOT, 'configs/mmseg/segformer_tap-fan-b-hybrid_cityscapes_demo.py')
NAME = 'tap_fan_tiny_8_p4_hybrid'
SMALL = dict(depth=2, embed_dim=64, num_heads=2, backbone_depths=(1, 1), backbone_dims=(16, 32))
SMALL_CH = [16, 32, 64, 64]


def _register():
    import mmseg.utils
    mmseg.utils.register_all_modules(init_default_scope=False)


def _cls_checkpoint(tmp_path, official=True):
    """A classification checkpoint with non-trivial BatchNorm statistics (eval-mode BN matters)."""
    torch.manual_seed(0)
    model = timm.create_model(NAME, num_classes=10, **SMALL)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    sd = model.state_dict()
    path = str(tmp_path / 'cls.pth')
    torch.save({'state_dict': sd, 'epoch': 3} if official else sd, path)
    return path, sd


def _backbone(ckpt, **kw):
    bb = TAPFAN(model_name=NAME, init_cfg=dict(type='Pretrained', checkpoint=ckpt), **{**SMALL, **kw})
    bb.init_weights()
    return bb.eval()


def test_tapfan_features_equal_timm_model(tmp_path):
    ckpt, _ = _cls_checkpoint(tmp_path)
    ref = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=ckpt, num_classes=10),
                            num_classes=10, **SMALL).eval()
    bb = _backbone(ckpt)
    assert bb.num_features == SMALL_CH
    x = torch.randn(2, 3, 64, 96)  # non-square: the official square reshape would fail here
    stem_maps = []
    hooks = [st.register_forward_hook(lambda m, i, o: stem_maps.append(o)) for st in ref.patch_embed.backbone.stages]
    with torch.no_grad():
        outs = bb(x)
        head_tokens, inter = ref.forward_intermediates(x, indices=[SMALL['depth'] - 1])
        _, ref_attn = ref(x, return_attn=True)
        with bb.record_attention():
            outs_rec = bb(x)
        attn = bb.pop_attention()
    for h in hooks:
        h.remove()
    assert [tuple(o.shape) for o in outs] == [(2, 16, 16, 24), (2, 32, 8, 12), (2, 64, 4, 6), (2, 64, 4, 6)]
    # maps 0, 1: the ConvNeXt stages; map 2: the last FAN block (exactly the timm model's intermediates)
    assert torch.equal(outs[0], stem_maps[0]) and torch.equal(outs[1], stem_maps[1])
    assert torch.equal(outs[2], inter[0])
    # map 3: patch tokens after the class-attention blocks, before the final norm the classifier applies
    tokens = outs[3].flatten(2).transpose(1, 2)
    torch.testing.assert_close(ref.norm(tokens), head_tokens[:, 1:], rtol=0, atol=1e-6)
    assert not torch.allclose(outs[3], outs[2])
    # recorded attention: one map per FAN block, those of the classification model's return_attn path
    assert len(attn) == SMALL['depth'] and attn[0].shape == (2, 2, 24, 24)
    for a, b in zip(attn, ref_attn):
        assert torch.equal(a, b)
    for a, b in zip(outs_rec, outs):  # the explicit attention path gives the same features
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match='record_attention'):
        bb.pop_attention()  # consumed
    with torch.no_grad():
        bb(x)
    with pytest.raises(RuntimeError, match='record_attention'):
        bb.pop_attention()  # nothing kept outside record_attention()


def test_tapfan_any_size_and_checkpoints(tmp_path):
    ckpt, sd = _cls_checkpoint(tmp_path)
    bb = _backbone(ckpt)
    x = torch.randn(1, 3, 70, 90)  # not a multiple of 16: zero-padded to 80x96, maps cropped to ceil(size / stride)
    with torch.no_grad():
        outs = bb(x)
        padded = bb(torch.nn.functional.pad(x, (0, 6, 0, 10)))
    sizes = [(math.ceil(70 / s), math.ceil(90 / s)) for s in (4, 8, 16, 16)]
    assert [tuple(o.shape[-2:]) for o in outs] == sizes
    for o, p in zip(outs, padded):
        assert torch.equal(o, p[..., :o.shape[-2], :o.shape[-1]])
    # the official segmentation checkpoint layout: 'backbone.' keys, no final norm, plus a decode head
    seg = {f'backbone.{k}': v for k, v in sd.items() if not k.startswith(('norm.', 'head.'))}
    seg['decode_head.linear_c4.proj.weight'] = torch.zeros(3, 3)
    torch.save({'state_dict': seg, 'meta': {}}, str(tmp_path / 'seg.pth'))
    bb2 = _backbone(str(tmp_path / 'seg.pth'))
    for a, b in zip(bb2.state_dict().values(), bb.state_dict().values()):
        assert torch.equal(a, b)
    # a checkpoint of the wrapper itself (full segmentor, mm format)
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in bb.state_dict().items()}}, str(tmp_path / 'mm.pth'))
    bb3 = _backbone(str(tmp_path / 'mm.pth'))
    assert all(torch.equal(a, b) for a, b in zip(bb3.state_dict().values(), bb.state_dict().values()))
    # a broken checkpoint names the key
    bad = {k: v for k, v in sd.items() if k != 'blocks.1.attn.q.weight'}
    torch.save({'state_dict': bad}, str(tmp_path / 'bad.pth'))
    with pytest.raises(CheckpointError, match='blocks.1.attn.q.weight'):
        _backbone(str(tmp_path / 'bad.pth'))


def test_tapfan_options():
    bb = TAPFAN(model_name=NAME, frozen_stages=2, **SMALL)
    bb.train()
    stem = bb.model.patch_embed.backbone
    assert all(not p.requires_grad for p in list(stem.stem.parameters()) + list(stem.stages.parameters()))
    assert all(p.requires_grad for p in bb.model.blocks.parameters())
    assert not stem.stages[1].training and bb.model.blocks.training
    bb = TAPFAN(model_name=NAME, norm_eval=True, **SMALL).train()
    bns = [m for m in bb.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and bb.model.blocks[0].attn.training
    # without map 3 the class-attention part is dropped (no unused parameters under DDP)
    bb = TAPFAN(model_name=NAME, out_indices=(0, 1, 2), **SMALL).eval()
    assert bb.model.cls_token is None and len(bb.model.cls_attn_blocks) == 0
    assert len(bb(torch.randn(1, 3, 32, 32))) == 3
    # block_index picks the FAN block of map 2
    bb = TAPFAN(model_name=NAME, block_index=0, out_indices=(2,), **SMALL).eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        ref = bb.model.forward_intermediates(x, indices=[0], intermediates_only=True)[0]
        assert torch.equal(bb(x)[0], ref)
    with pytest.raises(ValueError, match='out_indices'):
        TAPFAN(model_name=NAME, out_indices=(0, 4), **SMALL)
    with pytest.raises(ValueError, match='hybrid'):
        TAPFAN(model_name='tap_fan_tiny_12_p16_224', depth=1)
    with pytest.raises(ValueError, match='block_index'):
        TAPFAN(model_name=NAME, block_index=5, **SMALL)
    bb = TAPFAN(model_name=NAME, sync_dwconv_bn=True, **SMALL)
    assert isinstance(bb.model.blocks[0].mlp.mlp_v.dwconv.bn, torch.nn.SyncBatchNorm)


def _segmentor(loss_ad=None, backbone=None, **model_kw):
    from mmseg.registry import MODELS
    _register()
    cfg = Config.fromfile(DEMO)
    cfg.model.backbone.update(model_name=NAME, **SMALL)
    cfg.model.decode_head.update(in_channels=SMALL_CH, decoder_params=dict(embed_dim=16))
    cfg.model.data_preprocessor['size'] = (64, 96)
    if loss_ad == 'none':
        cfg.model.pop('loss_ad')
    elif loss_ad is not None:
        cfg.model.loss_ad = loss_ad
    if backbone is not None:
        cfg.model.backbone = backbone
    cfg.model.update(model_kw)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmseg'):
        return MODELS.build(cfg.model)


def _batch(model, n=2, train=True):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(1)
    samples = []
    for _ in range(n):
        s = SegDataSample(metainfo=dict(img_shape=(64, 96), ori_shape=(64, 96), pad_shape=(64, 96)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 19, (1, 64, 96), generator=g))
        samples.append(s)
    data = dict(inputs=[torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8, generator=g) for _ in range(n)],
                data_samples=samples)
    return model.data_preprocessor(data, train)


def test_loss_ad_in_loss_dict():
    # threshold 0.5 / N: at init the attention is near uniform (~1 / N), under the default 2 / N, where ADL is 0
    model = _segmentor(loss_ad=dict(loss_weight=0.5, threshold=0.5)).train()
    data = _batch(model)
    losses = model.loss(data['inputs'], data['data_samples'])
    assert 'loss_ad' in losses and 'decode.loss_ce' in losses
    assert torch.isfinite(losses['loss_ad']) and losses['loss_ad'].item() > 0
    # its gradient reaches the backbone: attention and TAP's dilation predictor, not the decode head
    model.zero_grad()
    losses['loss_ad'].backward()
    blk = model.backbone.model.blocks[0]
    assert blk.attn.q.weight.grad.abs().sum() > 0
    assert blk.dilation_predictor.proj[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.decode_head.parameters())
    # it equals the vitzoo loss of the same maps (train-mode BN: the same batch gives the same maps), times weight
    with torch.no_grad(), model.backbone.record_attention():
        model.backbone(data['inputs'])
    attn = model.backbone.pop_attention()
    assert len(attn) == SMALL['depth']
    expected = 0.5 * attention_diversification_loss(attn, threshold=0.5)
    torch.testing.assert_close(losses['loss_ad'].detach(), expected, rtol=0, atol=1e-7)
    # one image per GPU (the official recipe): the original's squeeze makes its ADL 0 there; here it is not
    one = _batch(model, n=1)
    assert model.loss(one['inputs'], one['data_samples'])['loss_ad'].item() > 0


def test_loss_ad_options_and_unchanged_inference():
    from mmseg.registry import MODELS
    model = _segmentor()
    assert model.adl.weight == 1.0 and model.adl.threshold == 2.0
    assert _segmentor(loss_ad='none', train_cfg=dict(adloss=2)).adl.weight == 2.0  # the official flag
    assert _segmentor(train_cfg=dict(adloss=2)).adl.weight == 1.0  # an explicit loss_ad wins
    off = _segmentor(loss_ad=dict(loss_weight=0.0)).train()
    data = _batch(off)
    assert 'loss_ad' not in off.loss(data['inputs'], data['data_samples'])
    with pytest.raises(ValueError, match='loss_weight'):
        _segmentor(loss_ad=dict(weight=1.0))
    pvt = dict(type='AgentPVT', depths=(1, 1, 1, 1))
    with pytest.raises(TypeError, match='attention maps'):
        _segmentor(backbone=pvt)
    # inference is the plain EncoderDecoder's (fused attention, nothing recorded)
    cfg = Config.fromfile(DEMO)
    cfg.model.backbone.update(model_name=NAME, **SMALL)
    cfg.model.decode_head.update(in_channels=SMALL_CH, decoder_params=dict(embed_dim=16))
    cfg.model.type = 'EncoderDecoder'
    cfg.model.pop('loss_ad')
    with DefaultScope.overwrite_default_scope('mmseg'):
        plain = MODELS.build(cfg.model)
    plain.load_state_dict(model.state_dict())
    model.eval()
    plain.eval()
    batch = _batch(model, train=False)
    with torch.no_grad():
        a = model.predict(batch['inputs'], batch['data_samples'])
        b = plain.predict(batch['inputs'], _batch(plain, train=False)['data_samples'])
    assert torch.equal(a[0].seg_logits.data, b[0].seg_logits.data)
    with pytest.raises(RuntimeError, match='record_attention'):
        model.backbone.pop_attention()
    # the official optimizer groups: decode head lr x10, no decay on norms, none of the backbone matched as 'head'
    from mmengine.optim import build_optim_wrapper
    wrapper = build_optim_wrapper(model, Config.fromfile(DEMO).optim_wrapper)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {names[id(p)]: (g['lr'], g['weight_decay']) for g in wrapper.optimizer.param_groups for p in g['params']}
    assert groups['backbone.model.blocks.0.attn.q.weight'] == (6e-5, 0.01)
    assert groups['backbone.model.blocks.0.norm1.weight'] == (6e-5, 0.0)
    assert groups['decode_head.linear_pred.weight'][0] == pytest.approx(6e-4)
    assert groups['decode_head.linear_c1.proj.weight'] == (pytest.approx(6e-4), 0.01)
    assert all(lr == 6e-5 for n, (lr, _) in groups.items() if n.startswith('backbone.'))


def test_e2e_segformer_tap_fan_demo(tmp_path):
    from vitzoo.data.dense import write_cityscapes
    import importlib.util
    spec = importlib.util.spec_from_file_location('_vitzoo_tool_mm_train_tap', osp.join(ROOT, 'tools', 'mm_train.py'))
    mm_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mm_train)
    data = str(tmp_path / 'city') + '/'
    write_cityscapes(data, num_train=2, num_val=1, img_size=(64, 128))
    options = [f'train_dataloader.dataset.data_root={data}', f'val_dataloader.dataset.data_root={data}',
               f'test_dataloader.dataset.data_root={data}', 'model.data_preprocessor.size=(64,128)',
               'model.backbone.depth=2', 'model.backbone.backbone_depths=(1,1)',
               'model.decode_head.decoder_params.embed_dim=32',
               'model.test_cfg.crop_size=(64,64)', 'model.test_cfg.stride=(48,48)',  # 3 slide windows
               'model.loss_ad.threshold=0.5',  # near-uniform attention at init is under the default 2 / N
               'train_cfg.max_iters=2', 'train_cfg.val_interval=2', 'default_hooks.checkpoint.interval=2']
    runner = mm_train.main([DEMO, '--work-dir', str(tmp_path / 'work'), '--cfg-options'] + options)
    assert runner.iter == 2
    hub = runner.message_hub
    loss_ad = hub.get_scalar('train/loss_ad').current()
    assert math.isfinite(loss_ad) and loss_ad > 0
    miou = hub.get_scalar('val/mIoU').current()
    assert 0.0 <= miou <= 100.0
    assert osp.isfile(str(tmp_path / 'work' / 'iter_2.pth'))


# ---- the official SegFormer MLP head ------------------------------------------------------------------------------

def _head(**kw):
    from mmseg.registry import MODELS
    _register()
    cfg = dict(type='SegFormerMLPHead', in_channels=SMALL_CH, in_index=[0, 1, 2, 3], feature_strides=[4, 8, 16, 32],
               channels=8, dropout_ratio=0.1, num_classes=5, norm_cfg=dict(type='BN', requires_grad=True),
               align_corners=False, decoder_params=dict(embed_dim=12))
    cfg.update(kw)
    with DefaultScope.overwrite_default_scope('mmseg'):
        return MODELS.build(cfg)


def _official_head_state_dict(in_channels, embed_dim, channels, num_classes, seed=0):
    """Random tensors under the names and shapes the official head's ``__init__`` creates.

    guoyongcs/TAPADL ``TAPADL_FAN/segmentation/mmseg/models/decode_heads/``: ``decode_head.py`` (BaseDecodeHead:
    ``conv_seg`` = Conv2d(channels, num_classes, 1)) and ``segformer_head.py`` (``linear_c{4,3,2,1}`` = MLP with
    ``proj`` = Linear(c_i, embed_dim); ``linear_fuse`` = ConvModule(4 * embed_dim, embed_dim, 1, SyncBN): ``conv``
    without bias and ``bn``; ``linear_pred`` = Conv2d(embed_dim, num_classes, 1)).
    """
    g = torch.Generator().manual_seed(seed)
    E = embed_dim

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    sd = {'conv_seg.weight': r(num_classes, channels, 1, 1), 'conv_seg.bias': r(num_classes)}
    for i in (4, 3, 2, 1):
        sd[f'linear_c{i}.proj.weight'] = r(E, in_channels[i - 1], scale=in_channels[i - 1] ** -0.5)
        sd[f'linear_c{i}.proj.bias'] = r(E)
    sd['linear_fuse.conv.weight'] = r(E, 4 * E, 1, 1, scale=(4 * E) ** -0.5)
    sd['linear_fuse.bn.weight'] = r(E)
    sd['linear_fuse.bn.bias'] = r(E)
    sd['linear_fuse.bn.running_mean'] = r(E)
    sd['linear_fuse.bn.running_var'] = torch.rand(E, generator=g) + 0.5
    sd['linear_fuse.bn.num_batches_tracked'] = torch.tensor(7)
    sd['linear_pred.weight'] = r(num_classes, E, 1, 1)
    sd['linear_pred.bias'] = r(num_classes)
    return sd


def _official_head_formula(sd, feats, order=(4, 3, 2, 1), align_corners=False, eps=1e-5):
    """The official SegFormerHead.forward in eval mode, written out with torch ops."""
    size = feats[0].shape[2:]
    maps = {}
    for i in (1, 2, 3, 4):
        x = feats[i - 1]
        n, _, h, w = x.shape
        t = x.flatten(2).transpose(1, 2) @ sd[f'linear_c{i}.proj.weight'].T + sd[f'linear_c{i}.proj.bias']
        y = t.permute(0, 2, 1).reshape(n, -1, h, w)
        if i != 1:
            y = F.interpolate(y, size=size, mode='bilinear', align_corners=align_corners)
        maps[i] = y
    y = F.conv2d(torch.cat([maps[i] for i in order], dim=1), sd['linear_fuse.conv.weight'])

    def bn(k):
        return sd[f'linear_fuse.bn.{k}'][None, :, None, None]

    y = (y - bn('running_mean')) / torch.sqrt(bn('running_var') + eps) * bn('weight') + bn('bias')
    return F.conv2d(torch.relu(y), sd['linear_pred.weight'], sd['linear_pred.bias'])


def test_segformer_mlp_head_equals_the_official_formula():
    sd = _official_head_state_dict(SMALL_CH, 12, 8, 5)
    head = _head()
    head.load_state_dict(sd, strict=True)
    head.eval()
    g = torch.Generator().manual_seed(2)
    # TAPFAN's maps of a 52x76 image (strides 4, 8, 16, 16): c1 13x19, sizes that are not multiples of each other
    sizes = [(13, 19), (7, 10), (4, 5), (4, 5)]
    feats = [torch.randn(2, c, h, w, generator=g) for c, (h, w) in zip(SMALL_CH, sizes)]
    with torch.no_grad():
        out = head(feats)
    ref = _official_head_formula(sd, feats)
    assert out.shape == (2, 5, 13, 19)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # not vacuous: the concatenation order and align_corners change the result
    assert (out - _official_head_formula(sd, feats, order=(1, 2, 3, 4))).abs().max() > 1e-2
    assert (out - _official_head_formula(sd, feats, align_corners=True)).abs().max() > 1e-2
    # the official forward resizes with align_corners=False whatever the config says (the config's value is for
    # the loss / predict resizes of mmseg's base head)
    head_ac = _head(align_corners=True)
    head_ac.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(head_ac.eval()(feats), ref, rtol=1e-5, atol=1e-5)
    # in_index selects the maps
    head_sel = _head(in_index=[1, 2, 3, 4])
    head_sel.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(head_sel.eval()([torch.zeros(1)] + feats), ref, rtol=1e-5, atol=1e-5)


def test_segformer_mlp_head_has_the_official_state_dict(tmp_path):
    head = _head()
    sd = _official_head_state_dict(SMALL_CH, 12, 8, 5)
    own = head.state_dict()
    assert list(own) == list(sd)  # the official names, in the official order
    assert all(own[k].shape == v.shape for k, v in sd.items())
    missing, unexpected = head.load_state_dict(sd, strict=False)
    assert not missing and not unexpected
    assert all(torch.equal(head.state_dict()[k], v) for k, v in sd.items())
    # the base head's conv_seg (never used by the SegFormer head) is frozen: no unused trainable parameter for DDP
    assert not any(p.requires_grad for p in head.conv_seg.parameters())
    assert all(p.requires_grad for n, p in head.named_parameters() if not n.startswith('conv_seg.'))
    # bad arguments: one clear error each
    with pytest.raises(ValueError, match='4 input maps'):
        _head(in_channels=SMALL_CH[:3], in_index=[0, 1, 2], feature_strides=[4, 8, 16])
    with pytest.raises(ValueError, match='feature_strides'):
        _head(feature_strides=[8, 4, 16, 32])
    with pytest.raises(ValueError, match='decoder_params'):
        _head(decoder_params=dict(embed_dim=12, dim=3))
    with pytest.raises(ValueError, match='multiple_select'):
        _head(input_transform='resize_concat')


def test_segformer_mlp_head_loads_the_official_segmentation_checkpoint(tmp_path):
    from mmseg.registry import MODELS
    _register()
    _, cls_sd = _cls_checkpoint(tmp_path)
    # the official segmentation checkpoint layout: 'backbone.' (no final norm) and 'decode_head.' keys
    head_sd = _official_head_state_dict(SMALL_CH, 16, 256, 19, seed=3)
    seg = {f'backbone.{k}': v for k, v in cls_sd.items() if not k.startswith(('norm.', 'head.'))}
    seg.update({f'decode_head.{k}': v for k, v in head_sd.items()})
    path = str(tmp_path / 'seg.pth')
    torch.save({'state_dict': seg, 'meta': {}}, path)

    def build(ckpt):
        cfg = Config.fromfile(DEMO)
        cfg.model.backbone.update(model_name=NAME, **SMALL)
        cfg.model.decode_head.update(in_channels=SMALL_CH, decoder_params=dict(embed_dim=16))
        # what the config comment / README give as --cfg-options
        cfg.merge_from_dict({'model.backbone.pretrained': ckpt, 'model.decode_head.init_cfg.type': 'Pretrained',
                             'model.decode_head.init_cfg.checkpoint': ckpt})
        with DefaultScope.overwrite_default_scope('mmseg'):
            model = MODELS.build(cfg.model)
        model.init_weights()
        return model

    model = build(path)
    got = model.decode_head.state_dict()
    assert set(got) == set(head_sd) and all(torch.equal(got[k], v) for k, v in head_sd.items())
    bb = _backbone(path)
    assert all(torch.equal(a, b) for a, b in zip(model.backbone.state_dict().values(), bb.state_dict().values()))
    # a checkpoint that does not fit names the key
    del seg['decode_head.linear_fuse.bn.running_var']
    torch.save({'state_dict': seg}, str(tmp_path / 'bad.pth'))
    with pytest.raises(RuntimeError, match='linear_fuse.bn.running_var'):
        build(str(tmp_path / 'bad.pth'))


def test_segformer_mlp_head_loss_and_predict():
    model = _segmentor(loss_ad=dict(loss_weight=0.0)).train()
    head = model.decode_head
    assert type(head).__name__ == 'SegFormerMLPHead' and head.embed_dim == 16
    data = _batch(model)
    losses = model.loss(data['inputs'], data['data_samples'])
    assert set(losses) == {'decode.loss_ce', 'decode.acc_seg'}
    assert torch.isfinite(losses['decode.loss_ce']) and losses['decode.loss_ce'].item() > 0
    losses['decode.loss_ce'].backward()
    for name in ('linear_c1.proj.weight', 'linear_c4.proj.weight', 'linear_fuse.conv.weight', 'linear_fuse.bn.weight',
                 'linear_pred.weight'):
        assert head.get_parameter(name).grad.abs().sum() > 0, name
    assert head.conv_seg.weight.grad is None
    model.eval()
    batch = _batch(model, train=False)
    with torch.no_grad():
        out = model.predict(batch['inputs'], batch['data_samples'])
        logits = head(model.extract_feat(batch['inputs']))
    assert out[0].seg_logits.data.shape == (19, 64, 96) and out[0].pred_sem_seg.data.shape == (1, 64, 96)
    assert logits.shape == (2, 19, 16, 24)  # the head predicts at stride 4
