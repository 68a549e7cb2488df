# Mask R-CNN + Agent-Swin-T, 3x: LeapLabTHU/Agent-Attention@207ce3e
# downstream/detection/configs/agent_swin/agent_swin_t_mrcnn_3x_9-12-14-7.py
_base_ = ['./_base_/agent-swin_mask-rcnn_fpn_3x_coco.py']
model = dict(backbone=dict(model_name='agent_swin_tiny', drop_path_rate=0.1))
