# Mask R-CNN + Agent-Swin, 3x.
_base_ = ['./agent-swin_mask-rcnn_fpn_1x_coco.py']

# 3x schedule (36 epochs, steps 27/33) with the DETR / Sparse R-CNN multi-scale augmentation of the official Swin
# configs (mmdet 3.x transform names).
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[[
            dict(type='RandomChoiceResize',
                 scales=[(1333, 480), (1333, 512), (1333, 544), (1333, 576), (1333, 608), (1333, 640),
                         (1333, 672), (1333, 704), (1333, 736), (1333, 768), (1333, 800)],
                 keep_ratio=True)
        ], [
            dict(type='RandomChoiceResize', scales=[(1333, 400), (1333, 500), (1333, 600)], keep_ratio=True),
            dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600), allow_negative_crop=True),
            dict(type='RandomChoiceResize',
                 scales=[(1333, 480), (1333, 512), (1333, 544), (1333, 576), (1333, 608), (1333, 640),
                         (1333, 672), (1333, 704), (1333, 736), (1333, 768), (1333, 800)],
                 keep_ratio=True)
        ]]),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
