_base_ = ['./_base_/agent-swin_mask-rcnn_fpn_3x_coco.py']
model = dict(backbone=dict(model_name='agent_swin_tiny', drop_path_rate=0.1))
