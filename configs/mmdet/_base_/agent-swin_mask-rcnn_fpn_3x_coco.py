# Mask R-CNN + Agent-Swin, 3x (36 epochs, steps 27/33), the 1x settings and augmentation otherwise:
# LeapLabTHU/Agent-Attention@207ce3e downstream/detection/configs/agent_swin/agent_swin_{t,s}_mrcnn_3x_9-12-14-7.py.
_base_ = ['./agent-swin_mask-rcnn_fpn_1x_coco.py']

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
# mmcv's linear warmup over 500 iterations (warmup_ratio 0.001) then steps: mmengine's LinearLR reaches its end
# factor at iteration end - 1, so end=501 gives mmcv's warmup_iters=500 exactly
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=501),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
