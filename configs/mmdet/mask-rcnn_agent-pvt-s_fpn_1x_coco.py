# Mask R-CNN + Agent-PVT-S, 1x: LeapLabTHU/Agent-Attention@207ce3e
# downstream/detection/configs/agent_pvt/agent_pvt_s_mrcnn_1x_12-16-28-28.py
_base_ = ['./_base_/agent-pvt_mask-rcnn_fpn_1x_coco.py']
model = dict(backbone=dict(model_name='agent_pvt_small', drop_path_rate=0.2))
