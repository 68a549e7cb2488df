# Semantic FPN + Agent-PVT-M, 40k: LeapLabTHU/Agent-Attention@207ce3e
# downstream/segmentation/configs/agent_pvt/fpn_agent_pvt_m_12-16-28-28.py
_base_ = ['./_base_/agent-pvt_fpn_40k_ade20k-512x512.py']
model = dict(backbone=dict(model_name='agent_pvt_medium', drop_path_rate=0.2))
