# Demo: SegFormer + TAP-FAN-B-Hybrid with ADL (`loss_ad`) on the embedded shapes data as a Cityscapes-format tree
# (128x256, 19 train ids), a few CPU iterations, slide inference on 128x128 windows.
# Data: python -m vitzoo.data.dense cityscapes data/shapes_cityscapes
# Run:  python tools/mm_train.py configs/mmseg/segformer_tap-fan-b-hybrid_cityscapes_demo.py
#       (add --cfg-options model.backbone.depth=2 "model.backbone.backbone_depths=(1,1)" for a quick run)
_base_ = ['./segformer_tap-fan-b-hybrid_160k_cityscapes-1024x1024.py']

data_root = 'data/shapes_cityscapes/'
crop_size = (128, 256)
norm_cfg = dict(type='BN', requires_grad=True)  # single process
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(sync_dwconv_bn=False),
    decode_head=dict(decoder_params=dict(embed_dim=128), norm_cfg=norm_cfg),  # decoder width 128 (official 768)
    test_cfg=dict(mode='slide', crop_size=(128, 128), stride=(96, 96)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False, sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(_delete_=True, type='CityscapesDataset', data_root=data_root,
                 data_prefix=dict(img_path='leftImg8bit/train', seg_map_path='gtFine/train'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type='CityscapesDataset', data_root=data_root,
                 data_prefix=dict(img_path='leftImg8bit/val', seg_map_path='gtFine/val'),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

train_cfg = dict(type='IterBasedTrainLoop', max_iters=4, val_interval=4)
param_scheduler = []
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(by_epoch=False, interval=4))
