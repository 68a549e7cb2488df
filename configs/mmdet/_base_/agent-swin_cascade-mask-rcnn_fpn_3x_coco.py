# Cascade Mask R-CNN + Agent-Swin, 3x (36 epochs, steps 27/33) with the DETR / Sparse R-CNN multi-scale augmentation
# and the Swin cascade recipe (4conv1fc SyncBN box heads, GIoU loss, decoded-box regression): LeapLabTHU/Agent-Attention
# @207ce3e downstream/detection/configs/agent_swin/agent_swin_{t,s,b}_crcnn_3x_9-12-14-7.py (mmdet 2.25 -> 3.x syntax,
# same values; checked against configs/official/mm.yaml by tests/test_recipes.py).
_base_ = [
    'mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['vitzoo.mmdet'], allow_failed_imports=False)

head_norm_cfg = dict(type='SyncBN', requires_grad=True)  # use type='BN' for single-process training


def _stage_head(stds):
    return dict(
        type='ConvFCBBoxHead', num_shared_convs=4, num_shared_fcs=1, in_channels=256, conv_out_channels=256,
        fc_out_channels=1024, roi_feat_size=7, num_classes=80,
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.], target_stds=stds),
        reg_class_agnostic=False, reg_decoded_bbox=True, norm_cfg=head_norm_cfg,
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=10.0))


model = dict(
    backbone=dict(
        _delete_=True,
        type='AgentSwinTransformer',
        model_name='agent_swin_tiny',
        img_size=224,
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        downstream_agent_shapes=[(9, 9), (12, 12), (14, 14), (7, 7)],
        # ImageNet checkpoint (official or vitzoo format), e.g. --cfg-options model.backbone.pretrained=PATH
        pretrained=None),
    neck=dict(in_channels=[96, 192, 384, 768]),
    roi_head=dict(bbox_head=[
        _stage_head([0.1, 0.1, 0.2, 0.2]),
        _stage_head([0.05, 0.05, 0.1, 0.1]),
        _stage_head([0.033, 0.033, 0.067, 0.067]),
    ]))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={k: dict(decay_mult=0.) for k in (
        'absolute_pos_embed', 'relative_position_bias_table', 'norm',
        'an_bias', 'na_bias', 'ah_bias', 'aw_bias', 'ha_bias', 'wa_bias')}))
# 8 GPUs x 2 images, as the official runs
auto_scale_lr = dict(enable=False, base_batch_size=16)

# The official AutoAugment policies in mmdet 3.x names: RandomChoice of (a) one resize to a random short side
# 480..800 (long side <= 1333), (b) resize to short side 400/500/600, random crop of 384..600 px, then (a).
_ms_scales = [(1333, 480), (1333, 512), (1333, 544), (1333, 576), (1333, 608), (1333, 640), (1333, 672),
              (1333, 704), (1333, 736), (1333, 768), (1333, 800)]
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[[
            dict(type='RandomChoiceResize', scales=_ms_scales, keep_ratio=True)
        ], [
            dict(type='RandomChoiceResize', scales=[(1333, 400), (1333, 500), (1333, 600)], keep_ratio=True),
            dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600), allow_negative_crop=True),
            dict(type='RandomChoiceResize', scales=_ms_scales, keep_ratio=True)
        ]]),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
# mmcv's linear warmup over 500 iterations (warmup_ratio 0.001) then steps: mmengine's LinearLR reaches its end
# factor at iteration end - 1, so end=501 gives mmcv's warmup_iters=500 exactly
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=501),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
