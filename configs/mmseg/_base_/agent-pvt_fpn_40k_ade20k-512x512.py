# Semantic FPN + Agent-PVT, 40k iterations on ADE20K 512x512 (AdamW lr 2e-4, wd 1e-4 on every parameter, poly power
# 0.9 to 0; 8 GPUs x 2 images): LeapLabTHU/Agent-Attention@207ce3e
# downstream/segmentation/configs/agent_pvt/fpn_agent_pvt_{t,s,m,l}_12-16-28-28.py (mmseg 0.28 -> 1.x syntax, same
# values; checked against configs/official/mm.yaml by tests/test_recipes.py).
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

# no paramwise_cfg: the official PVT FPN configs decay every parameter
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=1e-4))
# mmcv's poly policy lr * (1 - i / 40000) ** 0.9: mmengine's PolyLR reaches eta_min at iteration end - 1, hence 40001
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=40001, by_epoch=False)]
# 8 GPUs x 2 images, as the official runs
train_dataloader = dict(batch_size=2)
