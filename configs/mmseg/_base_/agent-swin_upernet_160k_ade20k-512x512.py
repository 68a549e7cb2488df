# UperNet + Agent-Swin, 160k iterations on ADE20K 512x512 (AdamW lr 6e-5, wd 0.01, linear warmup over 1500 iterations
# of a poly power-1.0 schedule; 8 GPUs x 2 images): LeapLabTHU/Agent-Attention@207ce3e
# downstream/segmentation/configs/agent_swin/upernet_agent_swin_{t,s,b}_9-12-14-7.py (mmseg 0.28 -> 1.x syntax, same
# values; checked against configs/official/mm.yaml by tests/test_recipes.py).
_base_ = [
    'mmseg::_base_/models/upernet_swin.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]
custom_imports = dict(imports=['vitzoo.mmseg'], allow_failed_imports=False)

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        _delete_=True,
        type='AgentSwinTransformer',
        model_name='agent_swin_tiny',
        img_size=224,
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        downstream_agent_shapes=[(9, 9), (12, 12), (14, 14), (7, 7)],
        # ImageNet checkpoint (official or vitzoo format), e.g. --cfg-options model.backbone.pretrained=PATH
        pretrained=None),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={k: dict(decay_mult=0.) for k in (
        'absolute_pos_embed', 'relative_position_bias_table', 'norm',
        'an_bias', 'na_bias', 'ah_bias', 'aw_bias', 'ha_bias', 'wa_bias')}))
# mmcv's poly policy with linear warmup: lr(i) = lr * (1 - i / 160000) from iteration 0, times the warmup factor
# 1e-6 + (1 - 1e-6) * i / 1500 for i < 1500 (overlapping mmengine schedulers multiply). mmengine's LinearLR / PolyLR
# reach their final value at iteration end - 1, hence end = 1501 / 160001 for mmcv's 1500 / 160000.
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1501),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=0, end=160001, by_epoch=False),
]
# 8 GPUs x 2 images, as the official runs
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
