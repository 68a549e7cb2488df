_base_ = ['./_base_/agent-pvt_retinanet_fpn_1x_coco.py']
model = dict(backbone=dict(model_name='agent_pvt_small'))
