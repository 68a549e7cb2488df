_base_ = ['./_base_/agent-swin_upernet_160k_ade20k-512x512.py']
model = dict(backbone=dict(model_name='agent_swin_tiny', drop_path_rate=0.2))
