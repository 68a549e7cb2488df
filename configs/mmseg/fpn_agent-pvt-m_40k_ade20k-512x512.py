_base_ = ['./_base_/agent-pvt_fpn_40k_ade20k-512x512.py']
model = dict(backbone=dict(model_name='agent_pvt_medium'))
