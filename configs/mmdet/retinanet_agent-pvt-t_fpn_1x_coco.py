# RetinaNet + Agent-PVT-T, 1x: LeapLabTHU/Agent-Attention@207ce3e
# downstream/detection/configs/agent_pvt/agent_pvt_t_rtn_1x_12-16-28-28.py
_base_ = ['./_base_/agent-pvt_retinanet_fpn_1x_coco.py']
model = dict(backbone=dict(model_name='agent_pvt_tiny', drop_path_rate=0.1))
