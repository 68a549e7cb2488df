"""Agent-DeiT: parity with the official implementation, a checkpoint at another resolution, sizes.

Any resolution, non-multiple inputs, checkpoint variants and bad checkpoints: the contract in test_models.py.
"""
import pytest
import timm
import torch

import vitzoo  # noqa: F401
from vitzoo.utils import count_macs, count_params, explicit_attention

from conftest import load_parity, parity_input


def _build_from_ref(ref, name, path, **kw):
    k = ref['official_kwargs']
    return timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=k['num_classes']),
        num_classes=k['num_classes'], embed_dim=k['embed_dim'], depth=k['depth'], num_heads=k['num_heads'],
        agent_num=k['agent_num'], agent_layer=k['agent_layer'], **kw).eval()


@pytest.mark.parametrize('ref_name,model_name', [
    ('agent_deit_tiny-like.pt', 'agent_deit_tiny'),
    ('agent_deit_base-like.pt', 'agent_deit_base'),
])
@pytest.mark.parametrize('fused', [True, False])
def test_parity_with_official(ref_name, model_name, fused, official_file):
    ref = load_parity(ref_name)
    model = _build_from_ref(ref, model_name, official_file(ref['state_dict']))
    x = parity_input(ref)
    with torch.no_grad():
        if fused:
            y = model(x)
        else:
            with explicit_attention(model):
                y = model(x)
    assert (y - ref['output']).abs().max().item() <= 1e-5


def test_checkpoint_into_other_resolution(official_file):
    """A 224 checkpoint loads into a model built at 448: pos table and agent biases are resized."""
    ref = load_parity('agent_deit_tiny-like.pt')
    model = _build_from_ref(ref, 'agent_deit_tiny', official_file(ref['state_dict']), img_size=448)
    assert model.blocks[0].attn.ah_bias.shape == (1, 2, 49, 28, 1)
    assert model.pos_embed.shape == (1, 785, 64)
    with torch.no_grad():
        y = model(torch.nn.functional.interpolate(parity_input(ref), size=448))
    assert torch.isfinite(y).all()


# name: (params in M, GMACs) measured from the official models
SPEC = {
    'agent_deit_tiny': (6.02, 1.17),
    'agent_deit_small': (22.65, 4.43),
    'agent_deit_small_448': (23.07, 17.64),
    'agent_deit_base': (87.20, 17.53),
}


@pytest.mark.parametrize('name', sorted(SPEC))
def test_params_and_flops_match_official(name):
    model = timm.create_model(name)
    params, gmacs = SPEC[name]
    assert abs(count_params(model) / 1e6 - params) / params < 0.005
    assert abs(count_macs(model, model.pretrained_cfg['input_size']) / 1e9 - gmacs) / gmacs < 0.01
