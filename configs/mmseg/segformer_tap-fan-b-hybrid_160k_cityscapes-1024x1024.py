# SegFormer head + TAP-FAN-B-Hybrid (TAP + ADL), 160k iterations on Cityscapes 1024x1024: the official recipe
# guoyongcs/TAPADL@6e4dbff TAPADL_FAN/segmentation/local_configs/fan/fan_hybrid/
# tapadl_fan_hybrid_base.1024x1024.city.160k.py
# (values checked against configs/official/mm.yaml by tests/test_recipes.py): 4 GPUs x 1 image,
# AdamW lr 6e-5, wd 0.01 (none on norms), head lr x10, poly (power 1.0) with a linear warmup over 1500 iterations,
# 1024x1024 crops, slide inference 1024 / 768, ADL as `loss_ad` (weight 1, threshold 2).
# ImageNet init: the released tapadl_fan_base.pth.tar, e.g. --cfg-options model.backbone.pretrained=PATH.
# Note: the official ADL is exactly 0 with one image per GPU (a squeeze bug, see vitzoo/mm/seg.py); vitzoo's is not.
# For what the official run effectively trained, set model.loss_ad.loss_weight=0.
_base_ = [
    'mmseg::_base_/models/segformer_mit-b0.py',
    'mmseg::_base_/datasets/cityscapes_1024x1024.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]
custom_imports = dict(imports=['vitzoo.mmseg'], allow_failed_imports=False)

crop_size = (1024, 1024)
data_preprocessor = dict(size=crop_size)
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    type='ADLEncoderDecoder',
    loss_ad=dict(loss_weight=1.0, threshold=2.0),
    data_preprocessor=data_preprocessor,
    backbone=dict(
        _delete_=True,
        type='TAPFAN',
        model_name='tap_fan_base_16_p4_hybrid',
        img_size=224,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.0,  # hard-coded 0 in the official segmentation FAN
        sync_dwconv_bn=True,  # the official DWConv norms are SyncBN (reverted to BN in a single process)
        # ImageNet checkpoint (official or vitzoo format), e.g. --cfg-options model.backbone.pretrained=PATH
        pretrained=None),
    # the official SegFormer all-MLP head (TAPADL_FAN/segmentation/mmseg/models/decode_heads/segformer_head.py) with
    # its parameter names: the released checkpoint's decode_head.* load as they are, e.g. with
    # --cfg-options model.decode_head.init_cfg.type=Pretrained model.decode_head.init_cfg.checkpoint=PATH.
    # The backbone's maps have strides 4, 8, 16, 16 (feature_strides is the official list; the head resizes every map
    # to the first one's size). channels=256 only sizes the unused conv_seg of mmseg's base head (as the official).
    decode_head=dict(
        _delete_=True,
        type='SegFormerMLPHead',
        in_channels=[128, 256, 448, 448],
        in_index=[0, 1, 2, 3],
        feature_strides=[4, 8, 16, 32],
        channels=256,
        dropout_ratio=0.1,
        num_classes=19,
        norm_cfg=norm_cfg,
        align_corners=False,
        decoder_params=dict(embed_dim=768),
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    test_cfg=dict(mode='slide', crop_size=(1024, 1024), stride=(768, 768)))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={
        'pos_block': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.),
        'head': dict(lr_mult=10.)}))
# mmcv's poly policy with linear warmup: lr(i) = lr * (1 - i / 160000) from iteration 0, times the warmup factor
# 1e-6 + (1 - 1e-6) * i / 1500 for i < 1500 (overlapping mmengine schedulers multiply). mmengine's LinearLR / PolyLR
# reach their final value at iteration end - 1, hence end = 1501 / 160001 for mmcv's 1500 / 160000.
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1501),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=0, end=160001, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=160000, val_interval=4000)
default_hooks = dict(checkpoint=dict(by_epoch=False, interval=4000))
# 4 GPUs x 1 image, as the official run (TAPADL_FAN/segmentation/README.md)
train_dataloader = dict(batch_size=1, num_workers=4)
val_dataloader = dict(batch_size=1, num_workers=4)
test_dataloader = val_dataloader
