_base_ = ['./_base_/agent-swin_upernet_160k_ade20k-512x512.py']
# the official Swin-S segmentation config pools a 7x7 agent grid in stage 3
model = dict(backbone=dict(
    model_name='agent_swin_small', drop_path_rate=0.3, downstream_agent_shapes=[(9, 9), (12, 12), (7, 7), (7, 7)]))
