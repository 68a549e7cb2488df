# RetinaNet + Agent-PVT, 1x, official downstream/detection settings.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['vitzoo.mmdet'], allow_failed_imports=False)

model = dict(
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
    neck=dict(in_channels=[64, 128, 320, 512], start_level=1, add_extra_convs='on_input'))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4),
    paramwise_cfg=dict(custom_keys={k: dict(decay_mult=0.) for k in (
        'absolute_pos_embed', 'pos_embed', 'relative_position_bias_table', 'norm',
        'an_bias', 'na_bias', 'ah_bias', 'aw_bias', 'ha_bias', 'wa_bias')}))
auto_scale_lr = dict(enable=False, base_batch_size=16)
