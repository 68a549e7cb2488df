# Cascade Mask R-CNN + Agent-Swin-B, 3x: LeapLabTHU/Agent-Attention@207ce3e
# downstream/detection/configs/agent_swin/agent_swin_b_crcnn_3x_9-12-14-7.py
_base_ = ['./_base_/agent-swin_cascade-mask-rcnn_fpn_3x_coco.py']
model = dict(
    backbone=dict(model_name='agent_swin_base', drop_path_rate=0.4),
    neck=dict(in_channels=[128, 256, 512, 1024]))
