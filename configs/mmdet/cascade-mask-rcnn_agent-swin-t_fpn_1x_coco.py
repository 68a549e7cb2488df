# Cascade Mask R-CNN + Agent-Swin-T, 1x (12 epochs, steps 8/11): the official agent_swin_t_crcnn_1x_9-12-14-7.py,
# the same Swin cascade recipe and DETR-style multi-scale augmentation as the 3x configs, drop path 0.1.
_base_ = ['./_base_/agent-swin_cascade-mask-rcnn_fpn_3x_coco.py']
model = dict(backbone=dict(model_name='agent_swin_tiny', drop_path_rate=0.1))

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
