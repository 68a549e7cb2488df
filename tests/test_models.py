"""The contract every registered vitzoo model family keeps, in the spirit of timm's tests/test_models.py.

Families are read from the registry (the module of each entrypoint), so a new family is covered without editing this
file. Each contract is written once: the cheap ones run for every registered name, the ones that compute run once per
family on a reduced-width configuration of one variant (``TINY``: same code path, a fraction of the cost on a 2-core
CPU; a family missing there runs its smallest variant at full size). Family files keep parity and family-specific
behaviour.
"""
import re
from collections import defaultdict
from typing import Any, Dict, List, Tuple

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import get_pretrained_cfg, model_entrypoint

from vitzoo.models import CheckpointError
from vitzoo.utils import list_models

MODELS = list_models()
FWD_SIZE = 160  # a multiple of every family's largest stride (32); small inputs keep the suite fast
BWD_SIZE = 128
NUM_CLASSES = 10


def _family(name: str) -> str:
    return model_entrypoint(name).__module__.rpartition('.')[2]


FAMILY_MODELS: Dict[str, List[str]] = defaultdict(list)
for _n in MODELS:
    FAMILY_MODELS[_family(_n)].append(_n)

# family -> (variant, reduced-width kwargs): the variant whose code path covers the family's options
TINY: Dict[str, Tuple[str, Dict[str, Any]]] = {
    'agent_deit': ('agent_deit_tiny', dict(embed_dim=64, depth=2, num_heads=2)),
    'agent_pvt': ('agent_pvt_tiny', dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), mlp_ratios=(2, 2, 2, 2),
                                         depths=(1, 1, 1, 1))),
    'agent_swin': ('agent_swin_tiny', dict(embed_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4))),
    'agent_cswin': ('agent_cswin_tiny', dict(embed_dim=16, depth=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))),
    'sparsifiner': ('sparsifiner_deit_tiny', dict(embed_dim=64, depth=2, num_heads=2)),
    'sat': ('sat_deit_tiny', dict(embed_dim=48, depth=3, num_heads=3)),
    # the TAP + convolutional-stem variant
    'fan': ('tap_fan_tiny_8_p4_hybrid', dict(embed_dim=32, depth=2, num_heads=2, backbone_depths=(1, 1),
                                             backbone_dims=(16, 32, 64, 128))),
    # the TAP '_plus' variant: its att_mask (block 0) is the superset of the RVT code paths
    'rvt': ('tap_rvt_base_plus', dict(base_dims=[16], depth=[2], heads=[2], masked_block=1)),
}


def _tiny_spec(family: str) -> Tuple[str, Dict[str, Any]]:
    if family in TINY:
        return TINY[family]
    names = FAMILY_MODELS[family]
    return next((n for n in names if 'tiny' in n), names[0]), {}  # a new family: its smallest variant, full size


FAMILIES = sorted(FAMILY_MODELS)
# families whose convolutional stem takes any input size (the official behaviour), not only multiples of the patch
ANY_SIZE = {'rvt'}


def _tiny(family: str, seed: int = 0, **kwargs) -> nn.Module:
    name, tiny = _tiny_spec(family)
    torch.manual_seed(seed)
    return timm.create_model(name, **dict(dict(tiny, num_classes=NUM_CLASSES), **kwargs))


def _default_size(family: str) -> int:
    return get_pretrained_cfg(_tiny_spec(family)[0]).input_size[-1]


def _stride(model: nn.Module) -> int:
    """The coarsest feature stride: inputs that are multiples of it are valid for every stage."""
    return max(i['reduction'] for i in model.feature_info)


# ---------------------------------------------------------------------------------------------- every registered name

def test_registry_is_populated():
    assert {'agent_deit_tiny', 'agent_deit_small', 'agent_deit_small_448', 'agent_deit_base'} <= set(MODELS)
    assert set(TINY) <= set(FAMILIES), f'TINY names a family that registers nothing: {set(TINY) - set(FAMILIES)}'
    for name in MODELS:
        assert timm.is_model(name)
    for family, (name, _) in TINY.items():
        assert name in FAMILY_MODELS[family], (family, name)


def _meta_model(name: str) -> nn.Module:
    """The full-size model on the meta device: parameters without memory or init, a fraction of a second each."""
    with torch.device('meta'):
        return timm.create_model(name)


@pytest.mark.parametrize('name', MODELS)
def test_pretrained_cfg_and_interface(name):
    """Every variant at full size: cfg entries name real keys; the timm interface is there."""
    model = _meta_model(name)
    with torch.device('meta'):
        cfg = model.pretrained_cfg
        assert cfg['num_classes'] == model.num_classes == 1000
        assert cfg['input_size'][0] == 3 and cfg['input_size'] == get_pretrained_cfg(name).input_size
        assert model.num_features > 0 and model.head_hidden_size > 0
        sd = model.state_dict()
        classifiers = cfg['classifier'] if isinstance(cfg['classifier'], (tuple, list)) else [cfg['classifier']]
        for c in classifiers:
            assert c + '.weight' in sd, f'classifier {c} not in state_dict'
        assert cfg['first_conv'] + '.weight' in sd, f"first_conv {cfg['first_conv']} not in state_dict"
        params = dict(model.named_parameters())
        assert model.no_weight_decay() <= set(params), model.no_weight_decay() - set(params)
        info = model.feature_info
        assert len(info) >= 1 and all(i['num_chs'] > 0 and i['reduction'] >= 1 for i in info)
        assert info[-1]['num_chs'] == model.num_features
        assert model.get_classifier() is not None
        model.reset_classifier(7)
        assert model.num_classes == 7 and model.get_classifier().weight.shape[0] == 7


# ------------------------------------------------------------------------------------------------------ once per family

@pytest.mark.parametrize('family', FAMILIES)
def test_forward_head_and_intermediates(family):
    model = _tiny(family).eval()
    x = torch.randn(2, 3, FWD_SIZE, FWD_SIZE)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, NUM_CLASSES) and torch.isfinite(y).all()
        feats = model.forward_features(x)
        assert feats.shape[0] == 2
        torch.testing.assert_close(model.forward_head(feats), y)
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
        # forward_intermediates: one map per feature_info entry, final output == forward_features
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, feats)
        assert len(inter) == len(model.feature_info) and all(t.dim() == 4 for t in inter)
        for t, i in zip(inter, model.feature_info):
            assert t.shape[1] == i['num_chs'] and t.shape[-1] == FWD_SIZE // i['reduction'], (t.shape, i)
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(only) == 2 and all(torch.equal(a, b) for a, b in zip(only, inter[-2:]))
        pool = model.global_pool
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
        model.reset_classifier(0, '')
        assert model(x).dim() >= 3
        model.reset_classifier(7, pool)
        assert model(x).shape == (2, 7)


@pytest.mark.parametrize('family', FAMILIES)
def test_prune_intermediate_layers(family):
    """Pruned after the second-to-last feature: the kept intermediates do not change."""
    model = _tiny(family).eval()
    x = torch.randn(1, 3, FWD_SIZE, FWD_SIZE)
    n = len(model.feature_info)
    with torch.no_grad():
        full = model.forward_intermediates(x, intermediates_only=True)
        model.prune_intermediate_layers(indices=[n - 2], prune_head=True, prune_norm=True)
        pruned = model.forward_intermediates(x, indices=[n - 2], intermediates_only=True)
    assert len(pruned) == 1 and torch.equal(pruned[0], full[n - 2])


@pytest.mark.parametrize('family', FAMILIES)
def test_backward_and_grad_checkpointing(family):
    """Train mode: every parameter gets a gradient; grad checkpointing changes neither outputs nor gradients."""
    model = _tiny(family).train()
    x = torch.randn(2, 3, BWD_SIZE, BWD_SIZE)
    torch.manual_seed(1)  # the same drop / noise draws for both runs
    y0 = model(x)
    assert y0.shape == (2, NUM_CLASSES)
    y0.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f'parameters without gradient: {missing[:10]}'
    g0 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    y1 = model(x)
    y1.mean().backward()
    torch.testing.assert_close(y1, y0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g0[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize('family', FAMILIES)
def test_features_only_matches_feature_info(family):
    n = len(_tiny(family).feature_info)  # the tiny configurations are shallower than timm's default out_indices
    model = _tiny(family, features_only=True, out_indices=tuple(range(n))).eval()
    x = torch.randn(1, 3, FWD_SIZE, FWD_SIZE)
    with torch.no_grad():
        feats = model(x)
    info = model.feature_info
    assert len(feats) == len(info.channels()) >= 1
    for f, c, r in zip(feats, info.channels(), info.reduction()):
        assert f.dim() == 4 and f.shape[1] == c and f.shape[-2:] == (FWD_SIZE // r, FWD_SIZE // r)


@pytest.mark.parametrize('family', FAMILIES)
def test_any_resolution_and_default_unchanged(family):
    """Larger and non-square inputs run (multiples of the coarsest stride); the default-size output is bit-identical
    afterwards (per-size caches do not leak between sizes)."""
    model = _tiny(family).eval()
    d, s = _default_size(family), _stride(model)
    x = torch.randn(1, 3, d, d)
    with torch.no_grad():
        y0 = model(x)
        for hw in ((d + 2 * s, d + 2 * s), (d - s, d + s), (FWD_SIZE, d)):
            y = model(torch.randn(2, 3, *hw))
            assert y.shape == (2, NUM_CLASSES) and torch.isfinite(y).all(), hw
        y1 = model(x)
    assert torch.equal(y0, y1)


@pytest.mark.parametrize('family', FAMILIES)
def test_non_multiple_input_is_a_clear_error(family):
    """An input the patch embedding cannot tile raises a ValueError naming the size and the multiple it needs.

    A convolutional stem (``ANY_SIZE``) floors like a convolution instead: there only an input too small for one token
    is an error."""
    model = _tiny(family).eval()
    d = _default_size(family)
    if family in ANY_SIZE:
        with torch.no_grad():
            assert model(torch.randn(1, 3, d + 2, d)).shape == (1, NUM_CLASSES)
            with pytest.raises(ValueError, match='12x64'):
                model(torch.randn(1, 3, 12, 64))
        return
    with pytest.raises(ValueError, match=rf'{d + 2}x{d} is not a multiple of the [a-z ]+ (\d+)') as err:
        with torch.no_grad():
            model(torch.randn(1, 3, d + 2, d))
    multiple = int(re.search(r'multiple of the [a-z ]+ (\d+)', str(err.value)).group(1))
    assert multiple > 2 and d % multiple == 0


def _save(path, state_dict: Dict[str, torch.Tensor], wrap: str = 'model', prefix: str = '') -> str:
    sd = {prefix + k: v for k, v in state_dict.items()}
    torch.save({wrap: sd} if wrap else sd, path)
    return str(path)


def _pretrained(family: str, path: str, **kwargs) -> nn.Module:
    """The tiny model built through timm's pretrained path from a local file."""
    return _tiny(family, seed=1, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=NUM_CLASSES),
                 **kwargs).eval()


@pytest.mark.parametrize('family', FAMILIES)
def test_checkpoint_variants_load(family, tmp_path):
    """A vitzoo state_dict loads through ``create_model(pretrained=True, pretrained_cfg_overlay=dict(file=...))``:
    plain, ``{'model': ...}``, ``{'state_dict': ...}`` and DDP ``module.`` prefixes give the same weights."""
    src = _tiny(family).eval()
    sd = src.state_dict()
    x = torch.randn(1, 3, FWD_SIZE, FWD_SIZE)
    with torch.no_grad():
        y = src(x)
    for i, (wrap, prefix) in enumerate((('', ''), ('model', ''), ('state_dict', 'module.'), ('model', 'module.'))):
        model = _pretrained(family, _save(tmp_path / f'{i}.pth', sd, wrap, prefix))
        loaded = model.state_dict()
        assert loaded.keys() == sd.keys()
        bad = [k for k in sd if not torch.equal(loaded[k], sd[k])]
        assert not bad, (wrap, prefix, bad[:5])
        with torch.no_grad():
            assert torch.equal(model(x), y), (wrap, prefix)


def _probe_key(model: nn.Module) -> Tuple[str, torch.Size]:
    """A Linear weight in the middle of the network (not the classifier): no family adapts or re-creates it."""
    head = model.pretrained_cfg['classifier']
    heads = tuple(head) if isinstance(head, (tuple, list)) else (head,)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith(heads)]
    name = linears[len(linears) // 2] + '.weight'
    return name, model.state_dict()[name].shape


def _shape(shape) -> str:
    return re.escape(str(tuple(shape)))


@pytest.mark.parametrize('family', FAMILIES)
def test_bad_checkpoint_names_the_key(family, tmp_path):
    """A missing key or a wrong shape is a CheckpointError naming the key and both shapes, not a silent init."""
    model = _tiny(family)
    sd = model.state_dict()
    key, shape = _probe_key(model)
    wrong = (shape[0] * 2, *shape[1:])
    bad = dict(sd, **{key: torch.zeros(wrong)})
    msg = rf"'{re.escape(key)}' has shape {_shape(wrong)}.*expects {_shape(shape)}"
    with pytest.raises(CheckpointError, match=msg):
        _pretrained(family, _save(tmp_path / 'shape.pth', bad))
    bad = dict(sd)
    del bad[key]
    with pytest.raises(CheckpointError, match=rf"missing key '{re.escape(key)}' \(expected shape {_shape(shape)}\)"):
        _pretrained(family, _save(tmp_path / 'missing.pth', bad))
