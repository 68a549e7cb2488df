# UperNet + Agent-Swin-S, 160k: LeapLabTHU/Agent-Attention@207ce3e
# downstream/segmentation/configs/agent_swin/upernet_agent_swin_s_9-12-14-7.py
_base_ = ['./_base_/agent-swin_upernet_160k_ade20k-512x512.py']
# the official Swin-S segmentation config pools a 7x7 agent grid in stage 3
model = dict(backbone=dict(
    model_name='agent_swin_small', drop_path_rate=0.3, downstream_agent_shapes=[(9, 9), (12, 12), (7, 7), (7, 7)]))
