"""Generic checks over every registered vitzoo model, in the spirit of timm's tests/test_models.py.

Three model constructions per architecture keep the suite affordable on a 2-core CPU: an eval model for forward /
cfg / head / intermediates checks, a train model for backward + grad-checkpointing, and a features_only wrapper.
"""
import math

import pytest
import timm
import torch

from vitzoo.utils import list_models

MODELS = list_models()
FWD_SIZE = 160  # any-resolution models: small inputs keep the suite fast
BWD_SIZE = 128


def test_registry_is_populated():
    assert {'agent_deit_tiny', 'agent_deit_small', 'agent_deit_small_448', 'agent_deit_base'} <= set(MODELS)
    for name in MODELS:
        assert timm.is_model(name)


@pytest.mark.parametrize('name', MODELS)
def test_model_forward_cfg_and_head(name):
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    assert model.num_classes == cfg['num_classes'] == 1000
    assert model.num_features > 0 and model.head_hidden_size > 0
    sd = model.state_dict()
    classifiers = cfg['classifier'] if isinstance(cfg['classifier'], (tuple, list)) else [cfg['classifier']]
    for c in classifiers:
        assert c + '.weight' in sd, f'classifier {c} not in state_dict'
    assert cfg['first_conv'] + '.weight' in sd, f"first_conv {cfg['first_conv']} not in state_dict"

    x = torch.randn(2, 3, FWD_SIZE, FWD_SIZE)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, 1000) and torch.isfinite(y).all()
        feats = model.forward_features(x)
        assert feats.shape[0] == 2
        torch.testing.assert_close(model.forward_head(feats), y)
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
        # forward_intermediates: one map per feature_info entry, final output == forward_features
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, feats)
        assert len(inter) == len(model.feature_info) and all(t.dim() == 4 for t in inter)
        pool = model.global_pool
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
        model.reset_classifier(0, '')
        assert model(x).dim() >= 3
        model.reset_classifier(7, pool)
        assert model(x).shape == (2, 7)


@pytest.mark.parametrize('name', MODELS)
def test_model_backward_and_grad_checkpointing(name):
    """Train mode, num_classes=42: every parameter gets a gradient; grad checkpointing changes nothing."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=42).train()
    x = torch.randn(2, 3, BWD_SIZE, BWD_SIZE)
    y0 = model(x)
    assert y0.shape == (2, 42)
    y0.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f'parameters without gradient: {missing[:10]}'
    g0 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    y1 = model(x)
    y1.mean().backward()
    torch.testing.assert_close(y1, y0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g0[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize('name', MODELS)
def test_features_only_matches_feature_info(name):
    model = timm.create_model(name, features_only=True).eval()
    x = torch.randn(1, 3, FWD_SIZE, FWD_SIZE)
    with torch.no_grad():
        feats = model(x)
    info = model.feature_info
    assert len(feats) == len(info.channels()) >= 1
    for f, c, r in zip(feats, info.channels(), info.reduction()):
        assert f.dim() == 4 and f.shape[1] == c
        assert FWD_SIZE // r - 1 <= f.shape[-1] <= math.ceil(FWD_SIZE / r) + 1
