# Demo: UperNet + Agent-Swin-T on the embedded shapes data (ADE20K-style folder, 128 px), a few CPU iterations.
# Data: python -m vitzoo.data.dense ade20k data/shapes_ade
# Run:  python tools/mm_train.py configs/mmseg/upernet_agent-swin-t_demo.py
_base_ = ['./_base_/agent-swin_upernet_160k_ade20k-512x512.py']

data_root = 'data/shapes_ade/'
crop_size = (128, 128)
metainfo = dict(classes=('background', 'circle_solid', 'square_solid', 'triangle_solid'),
                palette=[[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]])
norm_cfg = dict(type='BN', requires_grad=True)  # single process
model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(num_classes=4, norm_cfg=norm_cfg),
    auxiliary_head=dict(num_classes=4, norm_cfg=norm_cfg))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='PackSegInputs'),
]
_dataset = dict(type='BaseSegDataset', data_root=data_root, metainfo=metainfo, img_suffix='.png',
                seg_map_suffix='.png', reduce_zero_label=False)
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False, sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(_delete_=True, **_dataset,
                 data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, **_dataset,
                 data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

train_cfg = dict(type='IterBasedTrainLoop', max_iters=4, val_interval=4)
param_scheduler = []
default_hooks = dict(
    logger=dict(interval=1),
    checkpoint=dict(by_epoch=False, interval=2, max_keep_ckpts=2))
