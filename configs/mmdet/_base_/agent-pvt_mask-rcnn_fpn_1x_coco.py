# Mask R-CNN + Agent-PVT, 1x (12 epochs, steps 8/11): LeapLabTHU/Agent-Attention@207ce3e
# downstream/detection/configs/agent_pvt/agent_pvt_{t,s,m,l}_mrcnn_1x_12-16-28-28.py (mmdet 2.25 -> 3.x syntax, same
# values; checked against configs/official/mm.yaml by tests/test_recipes.py).
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['vitzoo.mmdet'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='AgentPVT',
        model_name='agent_pvt_tiny',
        img_size=224,
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        downstream_agent_shapes=[(12, 12), (16, 16), (28, 28), (28, 28)],
        # ImageNet checkpoint (official or vitzoo format), e.g. --cfg-options model.backbone.pretrained=PATH
        pretrained=None),
    neck=dict(in_channels=[64, 128, 320, 512]))

# AdamW lr 2e-4, wd 1e-4 on every parameter: the official PVT configs set no paramwise_cfg (unlike the Swin ones)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=1e-4))
# 8 GPUs x 2 images, as the official runs
auto_scale_lr = dict(enable=False, base_batch_size=16)

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
# mmcv's linear warmup over 500 iterations (warmup_ratio 0.001) then steps: mmengine's LinearLR reaches its end
# factor at iteration end - 1, so end=501 gives mmcv's warmup_iters=500 exactly
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=501),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
