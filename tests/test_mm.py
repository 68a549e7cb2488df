"""mmdet 3.x / mmseg 1.x integration: backbones, every config, end-to-end Runner training, Cityscapes-C tool.

Everything runs on CPU with reduced-depth backbones and 64-96 px inputs.
"""
import glob
import json
import os.path as osp
import pickle
import subprocess
import sys

import pytest
import torch

import mmengine  # noqa: E402,F401  (the det/seg extras are part of `make test`: a missing install must fail, not skip)

import timm  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

import vitzoo.mmdet  # noqa: E402,F401
import vitzoo.mmseg  # noqa: E402,F401
from vitzoo.mm import AgentCSwin, AgentPVT, AgentSwinTransformer, load_checkpoint_file  # noqa: E402
from vitzoo.layers.agent_attention import AgentAttention  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def _load_tool(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f'_vitzoo_tool_{name}', osp.join(ROOT, 'tools', f'{name}.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mm_train, mm_test, eval_cityscapes_c = (_load_tool(n) for n in ('mm_train', 'mm_test', 'eval_cityscapes_c'))

CONFIGS = sorted(
    p for d in ('mmdet', 'mmseg') for p in glob.glob(osp.join(ROOT, 'configs', d, '*.py')))

_registered = False


def _register():
    global _registered
    if not _registered:
        import mmdet.utils
        import mmseg.utils
        mmdet.utils.register_all_modules(init_default_scope=False)
        mmseg.utils.register_all_modules(init_default_scope=False)
        _registered = True


def _reduce_backbone(cfg: Config) -> None:
    bb = cfg.model.backbone
    if bb.type == 'TAPFAN':  # full widths (the head's in_channels), one FAN block, one block per ConvNeXt stage
        bb.update(depth=1, backbone_depths=(1, 1))
    else:
        bb['depths'] = (1, 1, 1, 1)
    bb.pop('pretrained', None)


def test_import_vitzoo_does_not_import_mm():
    code = 'import sys, vitzoo, vitzoo.models; assert "mmengine" not in sys.modules and "mmdet" not in sys.modules'
    subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT)


def test_config_list_complete():
    names = {osp.basename(p) for p in CONFIGS}
    for v in 'tsml':
        assert f'mask-rcnn_agent-pvt-{v}_fpn_1x_coco.py' in names
        assert f'retinanet_agent-pvt-{v}_fpn_1x_coco.py' in names
        assert f'fpn_agent-pvt-{v}_40k_ade20k-512x512.py' in names
    for v in 'ts':
        for s in ('1x', '3x'):
            assert f'mask-rcnn_agent-swin-{v}_fpn_{s}_coco.py' in names
    for v in 'tsb':
        assert f'cascade-mask-rcnn_agent-swin-{v}_fpn_3x_coco.py' in names
        assert f'upernet_agent-swin-{v}_160k_ade20k-512x512.py' in names
    assert 'cascade-mask-rcnn_agent-swin-t_fpn_1x_coco.py' in names
    assert 'segformer_tap-fan-b-hybrid_160k_cityscapes-1024x1024.py' in names
    assert 'segformer_tap-fan-b-hybrid_cityscapes_demo.py' in names


@pytest.mark.parametrize('path', CONFIGS, ids=[osp.basename(p) for p in CONFIGS])
def test_config_builds_and_runs(path):
    _register()
    cfg = Config.fromfile(path)
    assert cfg.custom_imports['imports'][0] in ('vitzoo.mmdet', 'vitzoo.mmseg')
    _reduce_backbone(cfg)
    is_det = '/mmdet/' in path
    scope = 'mmdet' if is_det else 'mmseg'
    opt = cfg.optim_wrapper
    assert opt.optimizer.type == 'AdamW'
    if cfg.model.backbone.type == 'TAPFAN':
        # the official SegFormer recipe: no decay on norms, head lr x10
        assert opt.paramwise_cfg.custom_keys['norm']['decay_mult'] == 0.0
        assert opt.paramwise_cfg.custom_keys['head']['lr_mult'] == 10.0
    elif cfg.model.backbone.type == 'AgentPVT':
        assert 'paramwise_cfg' not in opt  # the official PVT configs decay every parameter
    else:
        # Swin: AdamW without decay on norms, position tables and the six agent biases
        for k in ('norm', 'relative_position_bias_table', 'an_bias', 'na_bias', 'ah_bias', 'aw_bias', 'ha_bias',
                  'wa_bias'):
            assert opt.paramwise_cfg.custom_keys[k]['decay_mult'] == 0.0
    if is_det:
        from mmdet.registry import MODELS
        from mmdet.structures import DetDataSample
        # few proposals: the forward is what is tested, not the cost of 1000 RoIs through 3 cascade stages on CPU
        if 'rpn' in cfg.model.test_cfg:
            cfg.model.test_cfg.rpn.update(nms_pre=50, max_per_img=10)
        with DefaultScope.overwrite_default_scope(scope):
            model = MODELS.build(cfg.model)
        model.eval()
        h = w = 64
        batch = dict(inputs=[torch.randint(0, 256, (3, h, w), dtype=torch.uint8)],
                     data_samples=[DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w),
                                                               scale_factor=(1.0, 1.0), img_id=0))])
        with torch.no_grad(), DefaultScope.overwrite_default_scope(scope):
            out = model.test_step(batch)
        assert out[0].pred_instances.bboxes.shape[-1] == 4
    else:
        from mmseg.registry import MODELS
        from mmseg.structures import SegDataSample
        cfg.model.data_preprocessor['size'] = (64, 64)
        with DefaultScope.overwrite_default_scope(scope):
            model = MODELS.build(cfg.model)
        model.eval()
        batch = dict(inputs=[torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)],
                     data_samples=[SegDataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64)))])
        with torch.no_grad(), DefaultScope.overwrite_default_scope(scope):
            out = model.test_step(batch)
        n = cfg.model.decode_head.num_classes
        assert out[0].seg_logits.data.shape == (n, 64, 64)


def _save_cls_checkpoint(tmp_path, name, **kw):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kw)
    path = str(tmp_path / f'{name}.pth')
    torch.save({'model': model.state_dict(), 'epoch': 3}, path)
    return path


@pytest.mark.parametrize('cls,name,kw', [
    (AgentPVT, 'agent_pvt_tiny', dict(depths=(1, 1, 1, 1))),
    (AgentSwinTransformer, 'agent_swin_tiny', dict(depths=(1, 2, 1, 2))),
    (AgentCSwin, 'agent_cswin_tiny', dict(depth=(1, 1, 1, 1))),
])
def test_backbone_feature_parity(tmp_path, cls, name, kw):
    size = 96
    ckpt = _save_cls_checkpoint(tmp_path, name, img_size=size, **kw)
    feat_model = timm.create_model(
        name, features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=ckpt, num_classes=10),
        num_classes=10, img_size=size, **kw).eval()
    la = dict(la_split_size=None) if cls is AgentCSwin else {}
    agent_grids = [tuple(m.agent_hw) for m in feat_model.modules() if isinstance(m, AgentAttention)]
    assert agent_grids, 'the model has agent attention'
    # classification agent grids (the default) -> exactly the timm features_only maps
    bb = cls(model_name=name, img_size=size, out_norms=False, drop_path_rate=0.0,
             init_cfg=dict(type='Pretrained', checkpoint=ckpt), **kw)
    bb.init_weights()
    bb.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = feat_model(x) if not la else None
        outs = bb(x)
    if la:  # CSwin: compare against the timm model built global as the backbone (la_split_size=None)
        feat_model = timm.create_model(
            name, features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=ckpt, num_classes=10),
            num_classes=10, img_size=size, la_split_size=None, **kw).eval()
        with torch.no_grad():
            ref = feat_model(x)
    assert len(outs) == 4
    for a, b in zip(outs, ref):
        assert a.shape == b.shape
        assert torch.equal(a, b)
    # the official output norms (Swin / CSwin default) are LayerNorms over the same maps
    if cls is not AgentPVT:
        bbn = cls(model_name=name, img_size=size, drop_path_rate=0.0,
                  init_cfg=dict(type='Pretrained', checkpoint=ckpt), **kw)
        bbn.init_weights()
        bbn.eval()
        with torch.no_grad():
            outn = bbn(x)
            ln = bbn.norm2(ref[2].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(outn[2], ln, rtol=0, atol=1e-6)
    # other agent grids: the agents change, shapes do not
    shapes = [(5, 5), (6, 6), (4, 4), (3, 3)]
    bbd = cls(model_name=name, img_size=size, out_norms=False, drop_path_rate=0.0, downstream_agent_shapes=shapes,
              init_cfg=dict(type='Pretrained', checkpoint=ckpt), **kw)
    bbd.init_weights()
    bbd.eval()
    with torch.no_grad():
        outd = bbd(x)
    assert [o.shape for o in outd] == [o.shape for o in ref]
    assert not torch.allclose(outd[0], ref[0])
    for i, stage in enumerate(bbd.model.layers if cls is AgentSwinTransformer else bbd.model.stages):
        for m in stage.modules():
            if isinstance(m, AgentAttention):
                assert tuple(m.agent_hw) == shapes[i]


def test_agent_grid_bias_matches_official_order():
    """The downstream bias (official: resize to (H, W) first, then the agent grid) equals the core's computation."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    heads, p, win, (H, W), new = 2, 3, (8, 8), (10, 13), (5, 4)
    m = AgentAttention(16, num_heads=heads, agent_num=p * p, window_size=win, qkv_layout='q_kv')
    m.agent_hw = new
    with torch.no_grad():
        b1, b2 = m.get_biases((H, W))
        n = new[0] * new[1]
        # official downstream order (agent_pvt.py / agent_swin.py of downstream/)
        pb1 = F.interpolate(m.an_bias, size=(H, W), mode='bilinear')
        pb1 = pb1.reshape(heads, p, p, H * W).permute(0, 3, 1, 2)
        pb1 = F.interpolate(pb1, size=new, mode='bilinear').reshape(heads, H * W, n).permute(0, 2, 1)
        pb2 = F.interpolate((m.ah_bias + m.aw_bias).squeeze(0), size=(H, W), mode='bilinear')
        pb2 = pb2.reshape(heads, p, p, H * W).permute(0, 3, 1, 2)
        pb2 = F.interpolate(pb2, size=new, mode='bilinear').reshape(heads, H * W, n).permute(0, 2, 1)
        ab1 = F.interpolate(m.na_bias, size=(H, W), mode='bilinear')
        ab1 = ab1.reshape(heads, p, p, H * W).permute(0, 3, 1, 2)
        ab1 = F.interpolate(ab1, size=new, mode='bilinear').reshape(heads, H * W, n)
        ab2 = (m.ha_bias + m.wa_bias).squeeze(0).permute(0, 3, 1, 2)
        ab2 = F.interpolate(ab2, size=(H, W), mode='bilinear')
        ab2 = ab2.reshape(heads, p, p, H * W).permute(0, 3, 1, 2)
        ab2 = F.interpolate(ab2, size=new, mode='bilinear').reshape(heads, H * W, n)
    torch.testing.assert_close(b1[0], pb1 + pb2, rtol=0, atol=1e-6)
    torch.testing.assert_close(b2[0], ab1 + ab2, rtol=0, atol=1e-6)
    # the agents are pooled on the downstream grid
    x = torch.randn(1, H * W, 16)
    assert m(x, (H, W)).shape == x.shape


def test_frozen_stages_and_padding():
    bb = AgentSwinTransformer(depths=(1, 1, 1, 1), frozen_stages=1, drop_path_rate=0.0)
    bb.train()
    frozen = list(bb.model.patch_embed.parameters()) + list(bb.model.layers[0].parameters()) + \
        list(bb.norm0.parameters())
    assert all(not p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in bb.model.layers[1].parameters())
    assert not bb.model.layers[0].training and bb.model.layers[1].training
    outs = bb(torch.randn(1, 3, 70, 90))  # padded to 72x92 like the official patch embedding
    assert [tuple(o.shape[-2:]) for o in outs] == [(18, 23), (9, 12), (5, 6), (3, 3)]
    pvt = AgentPVT(depths=(1, 1, 1, 1), frozen_stages=0, drop_path_rate=0.0)
    assert not pvt.model.stages[0].pos_embed.requires_grad
    assert pvt.model.stages[0].blocks[0].attn.q.weight.requires_grad
    outs = pvt(torch.randn(1, 3, 70, 90))  # cropped to 68x88 (the official stride-4 conv floors)
    assert tuple(outs[0].shape[-2:]) == (17, 22)
    with pytest.raises(ValueError, match='out_indices'):
        AgentPVT(depths=(1, 1, 1, 1), out_indices=(0, 4))


def test_paramwise_no_decay():
    from mmengine.optim import build_optim_wrapper
    cfg = Config.fromfile(osp.join(ROOT, 'configs/mmdet/mask-rcnn_agent-swin-t_fpn_1x_coco.py'))
    bb = AgentSwinTransformer(depths=(1, 1, 1, 1), drop_path_rate=0.0)
    wrapper = build_optim_wrapper(bb, cfg.optim_wrapper)
    decay = {}
    names = {id(p): n for n, p in bb.named_parameters()}
    for g in wrapper.optimizer.param_groups:
        for p in g['params']:
            decay[names[id(p)]] = g['weight_decay']
    assert decay['model.layers.0.blocks.0.attn.an_bias'] == 0.0
    assert decay['model.layers.0.blocks.0.attn.wa_bias'] == 0.0
    assert decay['model.layers.3.blocks.0.attn.relative_position_bias_table'] == 0.0
    assert decay['norm0.weight'] == 0.0
    assert decay['model.layers.0.blocks.0.attn.qkv.weight'] == 0.05


def _run_train_resume_test(cfg_path, work_dir, options, metric_keys):
    no_val = ['val_cfg=None', 'val_dataloader=None', 'val_evaluator=None']  # evaluated once, by mm_test below
    args = [cfg_path, '--work-dir', work_dir, '--cfg-options'] + options + no_val
    runner = mm_train.main(args + ['train_cfg.max_iters=2'])
    assert runner.iter == 2
    assert osp.isfile(osp.join(work_dir, 'iter_2.pth'))
    # torch >= 2.6: a Runner checkpoint is refused weights-only outside the trusted work_dir ...
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint_file(osp.join(work_dir, 'iter_2.pth'))
    # ... and mmengine's loader is restored after the scoped override
    from mmengine.runner.checkpoint import CheckpointLoader, load_from_local
    assert CheckpointLoader._schemes[''] is load_from_local
    runner = mm_train.main([cfg_path, '--work-dir', work_dir, '--resume', '--cfg-options'] + options + no_val
                           + ['train_cfg.max_iters=3'])
    assert runner.iter == 3  # resumed at 2, trained one more
    assert osp.isfile(osp.join(work_dir, 'iter_3.pth'))
    metrics = mm_test.main([cfg_path, osp.join(work_dir, 'iter_3.pth'), '--work-dir', work_dir,
                            '--cfg-options'] + options)
    for k in metric_keys:
        assert k in metrics and metrics[k] == metrics[k]  # present and not NaN
    return metrics


def test_e2e_mask_rcnn_agent_pvt(tmp_path):
    from vitzoo.data.dense import write_coco
    data = str(tmp_path / 'coco') + '/'
    write_coco(data, num_train=4, num_val=2, img_size=96)
    cfg = osp.join(ROOT, 'configs/mmdet/mask-rcnn_agent-pvt-t_fpn_demo.py')
    options = [f'data_root={data}', f'train_dataloader.dataset.data_root={data}',
               f'val_dataloader.dataset.data_root={data}', f'test_dataloader.dataset.data_root={data}',
               f'val_evaluator.ann_file={data}annotations/instances_val.json',
               f'test_evaluator.ann_file={data}annotations/instances_val.json',
               'model.backbone.depths=(1,1,1,1)', 'default_hooks.checkpoint.interval=1']
    metrics = _run_train_resume_test(cfg, str(tmp_path / 'work'), options, ['coco/bbox_mAP', 'coco/segm_mAP'])
    assert 0.0 <= metrics['coco/bbox_mAP'] <= 1.0


def test_e2e_upernet_agent_swin(tmp_path):
    from vitzoo.data.dense import write_ade20k
    data = str(tmp_path / 'ade') + '/'
    write_ade20k(data, num_train=4, num_val=2, img_size=64)
    cfg = osp.join(ROOT, 'configs/mmseg/upernet_agent-swin-t_demo.py')
    options = [f'train_dataloader.dataset.data_root={data}', f'val_dataloader.dataset.data_root={data}',
               f'test_dataloader.dataset.data_root={data}', 'model.data_preprocessor.size=(64,64)',
               'model.backbone.depths=(1,1,1,1)', 'model.decode_head.channels=32',
               'model.auxiliary_head.channels=16', 'default_hooks.checkpoint.interval=1']
    metrics = _run_train_resume_test(cfg, str(tmp_path / 'work'), options, ['mIoU'])
    assert 0.0 <= metrics['mIoU'] <= 100.0


def test_cityscapes_c_tool(tmp_path):
    from mmseg.registry import MODELS
    from vitzoo.data.dense import write_cityscapes
    _register()
    data = str(tmp_path / 'city')
    write_cityscapes(data, num_train=1, num_val=2, img_size=(64, 128))
    cfg_path = osp.join(ROOT, 'configs/mmseg/fpn_agent-pvt-t_cityscapes_demo.py')
    cfg = Config.fromfile(cfg_path)
    _reduce_backbone(cfg)
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(cfg.model)
    ckpt = str(tmp_path / 'seg.pth')
    torch.save({'state_dict': model.state_dict()}, ckpt)
    work = str(tmp_path / 'cc')
    res = eval_cityscapes_c.main([
        cfg_path, ckpt, '--data-root', data, '--work-dir', work, '--severities', '1', '--max-images', '1',
        '--cfg-options', 'model.backbone.depths=(1,1,1,1)', 'model.data_preprocessor.size=(64,128)'])
    assert set(res['per_corruption']) == set(eval_cityscapes_c.CORRUPTIONS) and len(res['per_corruption']) == 16
    assert set(res['per_severity']['fog']) == {'1'}
    # noise corruptions stop at severity 3, the others go to 5
    assert eval_cityscapes_c.corruption_severities('shot_noise', [1, 2, 3, 4, 5]) == [1, 2, 3]
    assert eval_cityscapes_c.corruption_severities('frost', [1, 2, 3, 4, 5]) == [1, 2, 3, 4, 5]
    vals = list(res['per_corruption'].values())
    assert abs(res['average'] - sum(vals) / 16) < 1e-9
    saved = json.load(open(osp.join(work, 'cityscapes_c.json')))
    assert saved['average'] == res['average']
    assert sum(1 for _ in open(osp.join(work, 'cityscapes_c.csv'))) == 1 + 16 + 16 + 2
    # corruption images are deterministic per image
    src = osp.join(data, 'leftImg8bit', 'val')
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    eval_cityscapes_c.make_corrupted(src, a, 'impulse_noise', 2)
    eval_cityscapes_c.make_corrupted(src, b, 'impulse_noise', 2)
    fa = sorted(glob.glob(a + '/**/*.png', recursive=True))
    assert fa and all(open(x, 'rb').read() == open(x.replace(a, b), 'rb').read() for x in fa)


@pytest.mark.parametrize('corruption', ['snow', 'frost', 'spatter', 'jpeg_compression', 'gaussian_noise'])
def test_cityscapes_c_images_equal_the_official_generation(tmp_path, corruption):
    # guoyongcs/TAPADL TAPADL_FAN/segmentation/tools/gen_city_c.py: img = mmcv.imread(path) (BGR),
    # corrupt(img, corruption_name=p, severity=s), mmcv.imwrite(result, out_path); np.random seeded as the tool does
    import mmcv
    import numpy as np
    from vitzoo.data.dense import write_cityscapes
    from vitzoo.data.imagenet_c import load_imagecorruptions
    corrupt = load_imagecorruptions()
    data = str(tmp_path / 'city')
    write_cityscapes(data, num_train=0, num_val=1, img_size=(96, 160))
    src = osp.join(data, 'leftImg8bit', 'val')
    severity, seed = 3, 8
    out_dir = str(tmp_path / 'ours')
    (rel,) = eval_cityscapes_c.make_corrupted(src, out_dir, corruption, severity, seed=seed)
    ours = osp.join(out_dir, rel)

    bgr = mmcv.imread(osp.join(src, rel))
    np.random.seed(eval_cityscapes_c._image_seed(seed, corruption, severity, rel))
    official = corrupt(bgr, corruption_name=corruption, severity=severity)
    official_path = str(tmp_path / 'official' / osp.basename(rel))
    mmcv.imwrite(official, official_path)
    assert official.dtype == np.uint8 and official.shape == bgr.shape
    assert np.array_equal(mmcv.imread(ours), mmcv.imread(official_path))  # pixel-exact
    assert open(ours, 'rb').read() == open(official_path, 'rb').read()    # and the same file

    # the channel order matters for these corruptions: the same seed on the RGB array gives another image
    if corruption != 'gaussian_noise':
        np.random.seed(eval_cityscapes_c._image_seed(seed, corruption, severity, rel))
        from_rgb = corrupt(np.ascontiguousarray(bgr[..., ::-1]), corruption_name=corruption, severity=severity)
        assert not np.array_equal(from_rgb[..., ::-1], official)


# ---- released official dense checkpoints (mmdet 2.x / mmseg 0.x key layout) ---------------------------------------

_SCOPE = {'pvt': 'mmdet', 'swin': 'mmseg', 'fan': 'mmseg'}


def _official_case(case):
    """Demo config with its backbone reduced to the architecture of a parity reference (official key names)."""
    from conftest import load_parity
    ref = load_parity({'pvt': 'agent_pvt-like.pt', 'swin': 'agent_swin-like.pt', 'fan': 'tap_fan_hybrid-like.pt'}[case])
    k = ref['official_kwargs']
    if case == 'pvt':
        cfg = Config.fromfile(osp.join(ROOT, 'configs/mmdet/mask-rcnn_agent-pvt-t_fpn_demo.py'))
        cfg.model.backbone.update({a: k[a] for a in ('embed_dims', 'num_heads', 'mlp_ratios', 'depths', 'sr_ratios',
                                                     'agent_sr_ratios', 'agent_num', 'attn_type')})
        cfg.model.neck.in_channels = k['embed_dims']
        cfg.model.test_cfg.rpn.update(nms_pre=50, max_per_img=10)
    elif case == 'swin':
        cfg = Config.fromfile(osp.join(ROOT, 'configs/mmseg/upernet_agent-swin-t_demo.py'))
        cfg.model.backbone.update({a: k[a] for a in ('embed_dim', 'depths', 'num_heads', 'window_size', 'mlp_ratio',
                                                     'agent_num', 'attn_type')})
        chans = [k['embed_dim'] * 2 ** i for i in range(4)]
        cfg.model.decode_head.update(in_channels=chans, channels=16)
        cfg.model.auxiliary_head.update(in_channels=chans[2], channels=8)
    else:
        cfg = Config.fromfile(osp.join(ROOT, 'configs/mmseg/segformer_tap-fan-b-hybrid_cityscapes_demo.py'))
        b = k['backbone']['kwargs']
        cfg.model.backbone.update(embed_dim=k['embed_dim'], depth=k['depth'], num_heads=k['num_heads'],
                                  backbone_depths=b['depths'], backbone_dims=b['dims'], num_scales=k['num_scales'])
        cfg.model.decode_head.update(in_channels=[b['dims'][0], b['dims'][1], k['embed_dim'], k['embed_dim']],
                                     decoder_params=dict(embed_dim=16))
    cfg.model.backbone.pop('pretrained', None)
    if case != 'pvt':
        cfg.model.data_preprocessor['size'] = (64, 64)
    return cfg, ref


def _build_mm(cfg, scope):
    _register()
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    with DefaultScope.overwrite_default_scope(scope):
        return registry.build(cfg.model).eval()


def _reference_model(cfg, ref, case, tmp_path):
    """The mm model with the backbone from the reference's official classification weights (the parity-tested
    classification path of ``load_pretrained``) and every other tensor (Swin output norms, neck, heads, BatchNorm
    statistics) random."""
    torch.manual_seed(0)
    model = _build_mm(cfg, _SCOPE[case])
    path = str(tmp_path / 'cls.pth')
    torch.save({'model': ref['state_dict']}, path)
    model.backbone.load_pretrained(path)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if not key.startswith('backbone.model.') and t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if key.endswith('running_var') else torch.randn_like(t) * 0.2)
    return model


def _mm_outputs(model, case):
    """Backbone maps and the test-time predictions of a 64 px image (exact-comparison material)."""
    scope = _SCOPE[case]
    torch.manual_seed(1)
    img = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    meta = dict(img_shape=(64, 64), ori_shape=(64, 64))
    if case == 'pvt':
        from mmdet.structures import DetDataSample
        sample = DetDataSample(metainfo=dict(meta, scale_factor=(1.0, 1.0), img_id=0))
    else:
        from mmseg.structures import SegDataSample
        sample = SegDataSample(metainfo=meta)
    with torch.no_grad(), DefaultScope.overwrite_default_scope(scope):
        data = model.data_preprocessor(dict(inputs=[img], data_samples=[sample]), False)
        feats = list(model.backbone(data['inputs']))
        out = model.test_step(dict(inputs=[img], data_samples=[sample]))[0]
    if case == 'pvt':
        p = out.pred_instances
        return feats + [p.bboxes, p.scores, p.labels.float(), p.masks.float()]
    return feats + [out.seg_logits.data]


def _official_dense_checkpoint(ref, reference_sd, case):
    """The full checkpoint as the official code saves it: official backbone names, heads as in mmdet 2.x / mmseg 0.x.

    The backbone tensors are the parity reference's official classification state dict, minus what the official
    dense backbones do not build: the classifier (all), the final norm (Swin, TAP-FAN: LeapLabTHU/Agent-Attention
    downstream/*/backbones/agent_swin.py, guoyongcs/TAPADL TAPADL_FAN/segmentation/.../backbones/tap_fan.py) and the
    Swin shift masks (computed in forward there). The official Swin adds LayerNorms norm0..norm3 on its outputs (the
    same names as the wrapper's). Neck / head names are unchanged from mmdet 2.x / mmseg 0.x (see
    test_official_head_and_neck_keys), so they are taken from the reference model.
    """
    drop = ('head.',) + (('norm.',) if case in ('swin', 'fan') else ())
    sd = {f'backbone.{k}': v for k, v in ref['state_dict'].items()
          if not k.startswith(drop) and not k.endswith('attn_mask')}
    sd.update({k: v for k, v in reference_sd.items() if not k.startswith('backbone.model.')})
    return sd


@pytest.mark.parametrize('case', ['pvt', 'swin', 'fan'])
def test_official_full_checkpoint_loads_through_load_from(tmp_path, case):
    from mmengine.runner import load_checkpoint
    from vitzoo.models import CheckpointError
    cfg, ref = _official_case(case)
    scope = _SCOPE[case]
    reference = _reference_model(cfg, ref, case, tmp_path)
    official = _official_dense_checkpoint(ref, reference.state_dict(), case)
    marker = {'pvt': 'backbone.block1.0.attn.q.weight', 'swin': 'backbone.layers.0.downsample.reduction.weight',
              'fan': 'backbone.blocks.1.attn.q.weight'}[case]
    assert marker in official and not any(k.startswith('backbone.model.') for k in official)
    if case == 'swin':
        assert 'backbone.norm3.weight' in official and 'backbone.norm.weight' not in official
    path = str(tmp_path / 'official.pth')
    torch.save({'meta': {}, 'state_dict': official}, path)

    torch.manual_seed(123)  # another init: everything must come from the file
    model = _build_mm(cfg, scope)
    assert model.backbone.loaded_layout is None
    load_checkpoint(model, path, map_location='cpu', strict=False)  # what Runner.load_checkpoint (load_from) does
    assert model.backbone.loaded_layout == 'official'
    got, want = model.state_dict(), reference.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    outs, ref_outs = _mm_outputs(model, case), _mm_outputs(reference, case)
    assert len(outs) == len(ref_outs)
    # torch's own strict load (tools/eval_cityscapes_c.py) takes the same path
    plain = _build_mm(cfg, scope)
    assert not plain.load_state_dict(official, strict=True).missing_keys
    assert plain.backbone.loaded_layout == 'official'
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in want.items())
    for a, b in zip(outs, ref_outs):
        assert a.shape == b.shape and torch.equal(a, b)

    # a backbone tensor missing from the file: one error naming it (the vitzoo name it maps to), no random backbone
    missing = {'pvt': ('backbone.block1.0.attn.q.weight', 'stages.0.blocks.0.attn.q.weight'),
               'swin': ('backbone.norm2.weight', 'norm2.weight'),
               'fan': ('backbone.blocks.1.attn.q.weight', 'blocks.1.attn.q.weight')}[case]
    bad = {k: v for k, v in official.items() if k != missing[0]}
    torch.save({'meta': {}, 'state_dict': bad}, str(tmp_path / 'bad.pth'))
    with pytest.raises(CheckpointError, match=missing[1].replace('.', r'\.')):
        load_checkpoint(_build_mm(cfg, scope), str(tmp_path / 'bad.pth'), map_location='cpu', strict=False)
    # an official tensor of the wrong shape
    key = marker
    bad = dict(official, **{key: official[key][:, :-1]})
    torch.save({'meta': {}, 'state_dict': bad}, str(tmp_path / 'bad_shape.pth'))
    with pytest.raises(CheckpointError, match='shape'):
        load_checkpoint(_build_mm(cfg, scope), str(tmp_path / 'bad_shape.pth'), map_location='cpu', strict=False)

    if case == 'pvt':
        # the vitzoo layout (Runner checkpoints) loads as it is, and is held to the same standard
        torch.save({'meta': {}, 'state_dict': want}, str(tmp_path / 'ours.pth'))
        again = _build_mm(cfg, scope)
        load_checkpoint(again, str(tmp_path / 'ours.pth'), map_location='cpu', strict=False)
        assert again.backbone.loaded_layout == 'vitzoo'
        assert all(torch.equal(again.state_dict()[k], v) for k, v in want.items())
        partial = {k: v for k, v in want.items() if k != 'backbone.model.stages.1.pos_embed'}
        partial['backbone.model.stages.9.pos_embed'] = torch.zeros(1)
        torch.save({'meta': {}, 'state_dict': partial}, str(tmp_path / 'ours_bad.pth'))
        with pytest.raises(CheckpointError, match=r'model\.stages\.1\.pos_embed.*model\.stages\.9\.pos_embed'):
            load_checkpoint(_build_mm(cfg, scope), str(tmp_path / 'ours_bad.pth'), map_location='cpu', strict=False)
    # init_cfg with the official full checkpoint: the same mapping (Swin's output norms included)
    kwargs = {k: v for k, v in cfg.model.backbone.items() if k != 'type'}
    bb = type(model.backbone)(**kwargs, init_cfg=dict(type='Pretrained', checkpoint=path))
    bb.init_weights()
    assert all(torch.equal(v, want[f'backbone.{k}']) for k, v in bb.state_dict().items())


def test_mm_test_tool_with_an_official_checkpoint(tmp_path):
    from vitzoo.data.dense import write_ade20k
    data = str(tmp_path / 'ade') + '/'
    write_ade20k(data, num_train=1, num_val=2, img_size=64)
    cfg, ref = _official_case('swin')
    reference = _reference_model(cfg, ref, 'swin', tmp_path)
    ours = reference.state_dict()
    official = _official_dense_checkpoint(ref, ours, 'swin')
    paths = {}
    for name, sd in (('ours', ours), ('official', official),
                     ('no_backbone', {k: v for k, v in ours.items() if not k.startswith('backbone.')})):
        paths[name] = str(tmp_path / f'{name}.pth')
        torch.save({'meta': {}, 'state_dict': sd}, paths[name])
    bb, dh, ah = cfg.model.backbone, cfg.model.decode_head, cfg.model.auxiliary_head
    options = [f'{k}={v}'.replace(' ', '') for k, v in (
        ('model.backbone.embed_dim', bb.embed_dim), ('model.backbone.depths', bb.depths),
        ('model.backbone.num_heads', bb.num_heads), ('model.backbone.attn_type', bb.attn_type),
        ('model.decode_head.in_channels', dh.in_channels), ('model.decode_head.channels', dh.channels),
        ('model.auxiliary_head.in_channels', ah.in_channels), ('model.auxiliary_head.channels', ah.channels),
        ('model.data_preprocessor.size', (64, 64)), ('test_dataloader.dataset.data_root', data))]
    results = {}
    for name in ('ours', 'official'):
        work = str(tmp_path / f'work_{name}')
        out = str(tmp_path / f'{name}.pkl')
        mm_test.main([osp.join(ROOT, 'configs/mmseg/upernet_agent-swin-t_demo.py'), paths[name], '--work-dir', work,
                      '--out', out, '--cfg-options'] + options)
        log = open(glob.glob(osp.join(work, '*', '*.log'))[0]).read()
        layout = 'mapped from the official checkpoint layout' if name == 'official' else 'loaded from the vitzoo layout'
        assert f'mm_test: backbone AgentSwinTransformer (agent_swin_tiny) was {layout}' in log
        with open(out, 'rb') as f:
            results[name] = pickle.load(f)
    # the same predictions, bit for bit, from the official file and from the vitzoo file with the same weights
    assert len(results['official']) == len(results['ours']) == 2
    for a, b in zip(results['official'], results['ours']):
        assert torch.equal(a['seg_logits']['data'], b['seg_logits']['data'])
        assert torch.equal(a['pred_sem_seg']['data'], b['pred_sem_seg']['data'])
    # no backbone tensors at all: refused instead of testing a random backbone
    with pytest.raises(RuntimeError, match='no tensors for the backbone'):
        mm_test.main([osp.join(ROOT, 'configs/mmseg/upernet_agent-swin-t_demo.py'), paths['no_backbone'],
                      '--work-dir', str(tmp_path / 'work_none'), '--cfg-options'] + options)


def _official_2x_keys(kind, in_channels):
    """Neck / head state-dict names and shapes of the official mmdet 2.x / mmseg 0.x models (no backbone).

    Written from the official code (LeapLabTHU/Agent-Attention, vendored mmdet 2.25 / mmseg 0.x): ``necks/fpn.py``
    (``lateral_convs`` / ``fpn_convs`` ConvModules, extra convs appended to ``fpn_convs``), ``dense_heads/
    rpn_head.py`` (``rpn_conv`` / ``rpn_cls`` / ``rpn_reg``), ``dense_heads/retina_head.py`` (``cls_convs`` /
    ``reg_convs`` / ``retina_cls`` / ``retina_reg``), ``roi_heads/bbox_heads/convfc_bbox_head.py`` (``shared_convs`` /
    ``shared_fcs`` / ``fc_cls`` / ``fc_reg``), ``roi_heads/mask_heads/fcn_mask_head.py`` (``convs`` / ``upsample`` /
    ``conv_logits``), ``roi_heads/cascade_roi_head.py`` (ModuleLists of 3 box and 3 mask heads), and mmseg's
    ``decode_heads/{uper_head,psp_head,fcn_head,fpn_head,decode_head}.py``; with the settings of the official configs
    (``configs/_base_/models/{mask_rcnn_r50_fpn,mask_rcnn_swin_fpn,cascade_mask_rcnn_swin_fpn,retinanet_r50_fpn}.py``
    and ``agent_swin/*_crcnn_*.py`` for detection, ``_base_/models/{upernet_swin,fpn_r50}.py`` for segmentation).
    """
    sd = {}

    def conv(p, cout, cin, k, bn=False, bias=True):
        sd[f'{p}.conv.weight'] = (cout, cin, k, k)
        if bn:
            sd.update({f'{p}.bn.{n}': (cout,) for n in ('weight', 'bias', 'running_mean', 'running_var')})
            sd[f'{p}.bn.num_batches_tracked'] = ()
        elif bias:
            sd[f'{p}.conv.bias'] = (cout,)

    def lin(p, cout, cin, k=None):
        sd[f'{p}.weight'] = (cout, cin) if k is None else (cout, cin, k, k)
        sd[f'{p}.bias'] = (cout,)

    def fpn(start=0, num_outs=5, extra_on_input=False):
        for j, c in enumerate(in_channels[start:]):
            conv(f'neck.lateral_convs.{j}', 256, c, 1)
        n = len(in_channels) - start
        for j in range(n):
            conv(f'neck.fpn_convs.{j}', 256, 256, 3)
        for j in range(num_outs - n if extra_on_input else 0):
            conv(f'neck.fpn_convs.{n + j}', 256, in_channels[-1] if j == 0 else 256, 3)

    def rpn():
        lin('rpn_head.rpn_conv', 256, 256, 3)
        lin('rpn_head.rpn_cls', 3, 256, 1)  # 3 anchors, sigmoid
        lin('rpn_head.rpn_reg', 12, 256, 1)

    def mask_head(p):
        for i in range(4):
            conv(f'{p}.convs.{i}', 256, 256, 3)
        lin(f'{p}.upsample', 256, 256, 2)  # ConvTranspose2d(256, 256, 2): weight (in, out, 2, 2)
        lin(f'{p}.conv_logits', 80, 256, 1)

    if kind == 'mask_rcnn':
        fpn()
        rpn()
        lin('roi_head.bbox_head.shared_fcs.0', 1024, 256 * 7 * 7)
        lin('roi_head.bbox_head.shared_fcs.1', 1024, 1024)
        lin('roi_head.bbox_head.fc_cls', 81, 1024)
        lin('roi_head.bbox_head.fc_reg', 320, 1024)
        mask_head('roi_head.mask_head')
    elif kind == 'cascade':
        fpn()
        rpn()
        for s in range(3):  # ConvFCBBoxHead 4 convs (SyncBN, no conv bias) + 1 fc, class-specific regression
            p = f'roi_head.bbox_head.{s}'
            for i in range(4):
                conv(f'{p}.shared_convs.{i}', 256, 256, 3, bn=True)
            lin(f'{p}.shared_fcs.0', 1024, 256 * 7 * 7)
            lin(f'{p}.fc_cls', 81, 1024)
            lin(f'{p}.fc_reg', 320, 1024)
        for s in range(3):
            mask_head(f'roi_head.mask_head.{s}')
    elif kind == 'retinanet':
        fpn(start=1, extra_on_input=True)
        for i in range(4):
            conv(f'bbox_head.cls_convs.{i}', 256, 256, 3)
            conv(f'bbox_head.reg_convs.{i}', 256, 256, 3)
        lin('bbox_head.retina_cls', 9 * 80, 256, 3)  # 9 anchors x 80 classes (sigmoid)
        lin('bbox_head.retina_reg', 9 * 4, 256, 3)
    elif kind == 'upernet':
        for i in range(4):  # PPM pool scales (1, 2, 3, 6): Sequential(AdaptiveAvgPool2d, ConvModule)
            conv(f'decode_head.psp_modules.{i}.1', 512, in_channels[-1], 1, bn=True)
        conv('decode_head.bottleneck', 512, in_channels[-1] + 4 * 512, 3, bn=True)
        for i, c in enumerate(in_channels[:-1]):
            conv(f'decode_head.lateral_convs.{i}', 512, c, 1, bn=True)
            conv(f'decode_head.fpn_convs.{i}', 512, 512, 3, bn=True)
        conv('decode_head.fpn_bottleneck', 512, 4 * 512, 3, bn=True)
        lin('decode_head.conv_seg', 150, 512, 1)
        conv('auxiliary_head.convs.0', 256, in_channels[2], 3, bn=True)  # FCNHead num_convs=1, concat_input=False
        lin('auxiliary_head.conv_seg', 150, 256, 1)
    elif kind == 'fpn_seg':
        fpn(num_outs=4)
        for i in range(4):  # FPNHead, strides 4..32: i conv(+Upsample) pairs for i > 0, one conv for i = 0
            for k in range(max(1, i)):
                conv(f'decode_head.scale_heads.{i}.{2 * k}', 128, 256 if k == 0 else 128, 3, bn=True)
        lin('decode_head.conv_seg', 150, 128, 1)
    return sd


@pytest.mark.parametrize('name,kind', [
    ('mask-rcnn_agent-pvt-t_fpn_1x_coco.py', 'mask_rcnn'), ('mask-rcnn_agent-swin-s_fpn_3x_coco.py', 'mask_rcnn'),
    ('cascade-mask-rcnn_agent-swin-b_fpn_3x_coco.py', 'cascade'), ('retinanet_agent-pvt-l_fpn_1x_coco.py', 'retinanet'),
    ('upernet_agent-swin-t_160k_ade20k-512x512.py', 'upernet'), ('fpn_agent-pvt-m_40k_ade20k-512x512.py', 'fpn_seg'),
])
def test_official_head_and_neck_keys(name, kind):
    """mmdet 3.x / mmseg 1.x build our configs' necks and heads with the official 2.x / 0.x names and shapes, so a
    released checkpoint's non-backbone tensors load unchanged (only the backbone's names need mapping)."""
    path = glob.glob(osp.join(ROOT, 'configs', '*', name))[0]
    cfg = Config.fromfile(path)
    _reduce_backbone(cfg)
    model = _build_mm(cfg, 'mmdet' if '/mmdet/' in path else 'mmseg')
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith('backbone.')}
    widths = {'pvt': [64, 128, 320, 512], 'swin-t': [96, 192, 384, 768], 'swin-s': [96, 192, 384, 768],
              'swin-b': [128, 256, 512, 1024]}
    variant = next(v for v in widths if f'agent-{v}' in name) if 'swin' in name else 'pvt'
    official = _official_2x_keys(kind, widths[variant])
    assert sorted(set(official) - set(ours)) == [] and sorted(set(ours) - set(official)) == []
    assert {k: v for k, v in ours.items() if official[k] != v} == {}
