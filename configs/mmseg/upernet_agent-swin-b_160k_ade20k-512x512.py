# UperNet + Agent-Swin-B, 160k: LeapLabTHU/Agent-Attention@207ce3e
# downstream/segmentation/configs/agent_swin/upernet_agent_swin_b_9-12-14-7.py
_base_ = ['./_base_/agent-swin_upernet_160k_ade20k-512x512.py']
model = dict(
    backbone=dict(model_name='agent_swin_base', drop_path_rate=0.5),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
