# Cascade Mask R-CNN + Agent-Swin-T, 1x (12 epochs, steps 8/11): LeapLabTHU/Agent-Attention@207ce3e
# downstream/detection/configs/agent_swin/agent_swin_t_crcnn_1x_9-12-14-7.py, the cascade recipe and multi-scale
# augmentation of the 3x configs with the 1x schedule.
_base_ = ['./_base_/agent-swin_cascade-mask-rcnn_fpn_3x_coco.py']
model = dict(backbone=dict(model_name='agent_swin_tiny', drop_path_rate=0.1))

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
# mmcv's linear warmup over 500 iterations (warmup_ratio 0.001) then steps: mmengine's LinearLR reaches its end
# factor at iteration end - 1, so end=501 gives mmcv's warmup_iters=500 exactly
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=501),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
