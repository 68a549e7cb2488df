# Semantic FPN + Agent-PVT, 40k iterations on ADE20K 512x512, official downstream/segmentation settings
# (AdamW lr 2e-4, wd 1e-4, poly power 0.9; 8 GPUs x 2 images).
_base_ = [
    'mmseg::_base_/models/fpn_r50.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_40k.py',
]
custom_imports = dict(imports=['vitzoo.mmseg'], allow_failed_imports=False)

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='AgentPVT',
        model_name='agent_pvt_tiny',
        img_size=224,
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        downstream_agent_shapes=[(12, 12), (16, 16), (28, 28), (28, 28)],
        # ImageNet checkpoint (official or vitzoo format), e.g. --cfg-options model.backbone.pretrained=PATH
        pretrained=None),
    neck=dict(in_channels=[64, 128, 320, 512]),
    decode_head=dict(num_classes=150))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=1e-4),
    paramwise_cfg=dict(custom_keys={k: dict(decay_mult=0.) for k in (
        'absolute_pos_embed', 'pos_embed', 'relative_position_bias_table', 'norm',
        'an_bias', 'na_bias', 'ah_bias', 'aw_bias', 'ha_bias', 'wa_bias')}))
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=40000, by_epoch=False)]
train_dataloader = dict(batch_size=2)
