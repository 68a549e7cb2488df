_base_ = ['./_base_/agent-swin_cascade-mask-rcnn_fpn_3x_coco.py']
model = dict(
    backbone=dict(model_name='agent_swin_base', drop_path_rate=0.3),
    neck=dict(in_channels=[128, 256, 512, 1024]))
