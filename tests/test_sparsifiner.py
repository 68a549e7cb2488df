"""Sparsifiner: parity with the official implementation, modes and gradients, token pruning, training phases, FLOPs."""
import math
from contextlib import nullcontext

import pytest
import timm
import torch

import vitzoo  # noqa: F401
from vitzoo.data.shapes import render_sample
from vitzoo.layers.sparse_attention import (
    ConnectivityPredictor, attention_budget, mask_from_indices, resize_token_projection, topk_nonneg)
from vitzoo.losses.sparsifiner import (
    SparsifinerLoss, attn_recon_loss, cls_distill_loss, distill_loss, teacher_outputs, token_distill_loss)
from vitzoo.models import CheckpointError
from vitzoo.models.sparsifiner import TOKEN_SPARSE_KWARGS, sparsifiner_flops
from vitzoo.utils import count_macs, count_params, explicit_attention

from conftest import load_parity, parity_input

REF = 'sparsifiner_deit-like.pt'
SMALL = dict(embed_dim=64, depth=2, num_heads=2)  # the reference file's backbone


@pytest.fixture(scope='module')
def ref():
    return load_parity(REF)


def _build_from_ref(ref, path, **kw):
    k = ref['official_kwargs']
    assert k['reduce_n_factor'] == 6 and k['reduce_c_factor'] == 2 and k['attn_keep_rate_list'] == [0.25, 0.25]
    return timm.create_model(
        'sparsifiner_deit_small', pretrained=True,
        pretrained_cfg_overlay=dict(file=path, num_classes=k['num_classes']), num_classes=k['num_classes'],
        embed_dim=k['embed_dim'], depth=k['depth'], num_heads=k['num_heads'], **kw).eval()


def _mismatches(masks, ref_masks):
    return sum(int((m != r).sum()) for m, r in zip(masks, ref_masks))


@pytest.mark.parametrize('fused', [True, False])
def test_parity_with_official(ref, fused, official_file):
    """Logits and masks of the sparse (eval) forward; masks are compared in float64 if fp32 near-ties flip."""
    model = _build_from_ref(ref, official_file(ref['state_dict']))
    x = parity_input(ref)
    with torch.no_grad(), explicit_attention(model) if not fused else nullcontext():
        out = model.forward_dict(x, return_masks=True)
    assert (out['logits'] - ref['output']).abs().max().item() <= 1e-5
    if _mismatches(out['masks'], ref['masks']):
        model.double()
        with torch.no_grad():
            out = model.forward_dict(x.double(), return_masks=True)
    assert _mismatches(out['masks'], ref['masks']) == 0
    for m in out['masks']:  # class-token row dense, every other row exactly ceil(0.25 * 197) = 50 keys
        assert m[:, :, 0].all() and (m[:, :, 1:].sum(-1) == 50).all()


def test_parity_float64(ref, official_file):
    """``model.double()`` runs the whole model (predictor, top-k, bias, SDPA) in float64 with exact masks."""
    model = _build_from_ref(ref, official_file(ref['state_dict'])).double()
    x = parity_input(ref).double()
    with torch.no_grad():
        out = model.forward_dict(x, return_masks=True)
    assert out['logits'].dtype == torch.float64
    assert (out['logits'] - ref['output'].double()).abs().max().item() <= 1e-5
    assert _mismatches(out['masks'], ref['masks']) == 0


def test_parity_dense_attn_recon_mode(ref, official_file):
    """The official phase-1 forward (train mode, USE_ATTN_RECON): dense attention -> ``output_dense``."""
    model = _build_from_ref(ref, official_file(ref['state_dict'])).train()
    model.attn_recon = True
    x = parity_input(ref)
    for fused in (True, False):
        with torch.no_grad():
            model.blocks[0].attn.fused_attn = model.blocks[1].attn.fused_attn = fused
            y = model(x)
        assert (y - ref['output_dense']).abs().max().item() <= 1e-5
    assert (y - ref['output']).abs().max().item() > 1e-4  # the dense and sparse modes really differ


def test_sparsity_stats_match_official(ref, official_file):
    """The official eval-mode averages: basis sparsity, basis-coefficient sparsity, mask sparsity."""
    model = _build_from_ref(ref, official_file(ref['state_dict']))
    stats = ref['sparsity_stats']
    basis = [(b.attn.mask_predictor.proj_back_n.abs() <= 0.02).float().mean() for b in model.blocks]
    assert abs(float(sum(basis) / len(basis)) - stats['basis_sparsity']) < 1e-6
    assert 1 - 8 / model.blocks[0].attn.mask_predictor.rank == stats['basis_coef_sparsity']
    with torch.no_grad():
        masks = model.forward_dict(parity_input(ref), return_masks=True)['masks']
    sparsity = sum(1 - m.float().mean() for m in masks) / len(masks)
    assert abs(float(sparsity) - stats['attn_mask_sparsity']) < 1e-6


def test_bad_checkpoint_names_key_and_shapes(ref, official_file):
    sd = dict(ref['state_dict'])
    sd['blocks.1.attn.mask_predictor.proj_c_q.weight'] = torch.zeros(8, 32)
    with pytest.raises(CheckpointError, match=r"'blocks\.1\.attn\.mask_predictor\.proj_c_q\.weight' has shape \(8, 32\)"
                                              r".*expects \(16, 32\)"):
        _build_from_ref(ref, official_file(sd))
    sd = dict(ref['state_dict'])
    del sd['blocks.0.attn.mask_predictor.proj_n']  # a partial predictor is an error, not a fresh init
    with pytest.raises(CheckpointError, match=r"missing key 'blocks\.0\.attn\.mask_predictor\.proj_n' "
                                              r"\(expected shape \(197, 32\)\)"):
        _build_from_ref(ref, official_file(sd))


def test_init_from_plain_deit_checkpoint(official_file):
    """A timm DeiT state_dict initialises the backbone (keep 1.0 == DeiT exactly); the predictor keeps its init."""
    torch.manual_seed(0)
    deit = timm.create_model('deit_small_patch16_224', num_classes=10, **SMALL).eval()
    path = official_file(deit.state_dict(), wrap='model')
    kw = dict(pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=10), num_classes=10, **SMALL)
    dense = timm.create_model('sparsifiner_deit_small', attn_keep_rate=1.0, **kw).eval()
    torch.manual_seed(1)
    sparse = timm.create_model('sparsifiner_deit_small', **kw).eval()
    torch.manual_seed(1)
    fresh = timm.create_model('sparsifiner_deit_small', num_classes=10, **SMALL)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        y_deit, y_dense, y_sparse = deit(x), dense(x), sparse(x)
        t_deit, t_dense = teacher_outputs(deit, x), teacher_outputs(dense, x)
    assert (y_dense - y_deit).abs().max().item() <= 1e-5
    assert (y_sparse - y_deit).abs().max().item() > 1e-5  # the sparse model really masks
    for a, b in zip(t_deit['attn'], t_dense['attn']):  # teacher maps via timm hooks == the dense explicit path
        assert (a - b).abs().max().item() <= 1e-6
    torch.testing.assert_close(t_deit['features'], t_dense['features'], atol=1e-5, rtol=0)
    pred = {k: v for k, v in sparse.state_dict().items() if 'mask_predictor' in k}
    assert len(pred) == 2 * 6
    for k, v in pred.items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def test_checkpoint_into_other_resolution(ref, official_file):
    """A 224 checkpoint loads into a 320 model: pos table and token projections are resized (rank kept)."""
    model = _build_from_ref(ref, official_file(ref['state_dict']), img_size=320, rank=32)
    pred = model.blocks[0].attn.mask_predictor
    assert pred.proj_n.shape == pred.proj_back_n.shape == (1 + 20 * 20, 32)
    assert model.pos_embed.shape == (1, 401, 64)
    expected = resize_token_projection(ref['state_dict']['blocks.0.attn.mask_predictor.proj_n'], (20, 20), (14, 14),
                                       rescale=True)
    torch.testing.assert_close(pred.proj_n.data, expected)
    assert torch.equal(pred.proj_n.data[0], ref['state_dict']['blocks.0.attn.mask_predictor.proj_n'][0])
    with torch.no_grad():
        y = model(torch.nn.functional.interpolate(parity_input(ref), size=320))
    assert torch.isfinite(y).all()


def test_any_resolution(ref, official_file):
    """Other sizes run with resized token projections and budget ceil(0.25 * n); 224 is unchanged afterwards."""
    model = _build_from_ref(ref, official_file(ref['state_dict']))
    x = parity_input(ref)
    with torch.no_grad():
        for size, n in (((288, 288), 1 + 18 * 18), ((320, 192), 1 + 20 * 12), ((96, 96), 37)):
            out = model.forward_dict(torch.randn(2, 3, *size), return_masks=True)
            assert out['logits'].shape == (2, 10) and torch.isfinite(out['logits']).all()
            assert out['approx_attn'][0].shape == (2, 2, n - 1, n)
            assert (out['masks'][1][:, :, 1:].sum(-1) == math.ceil(0.25 * n)).all()
        y = model(x)
    assert (y - ref['output']).abs().max().item() <= 1e-5
    # proj_n sums over tokens: its resized patch rows are rescaled, proj_back_n's are not
    p = torch.randn(1 + 16, 4)
    up, down = resize_token_projection(p, (8, 8), (4, 4)), resize_token_projection(p, (8, 8), (4, 4), rescale=True)
    torch.testing.assert_close(down[1:], up[1:] / 4)
    assert torch.equal(up[0], p[0])


def test_budget_and_mask_helpers():
    assert attention_budget(0.25, 197) == 50
    assert attention_budget(0.25, 197, num_active=1 + 30) == 30  # official: min(budget, active patch tokens)
    assert attention_budget(1.0, 197) == 197
    idx = torch.tensor([[[[0, 2], [1, 2]]]])  # B=1, H=1, 2 predicted rows
    mask = mask_from_indices(idx, 3)
    assert mask.tolist() == [[[[True, True, True], [True, False, True], [False, True, True]]]]


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_topk_nonneg_is_torch_topk(dtype):
    """The integer-view selection returns exactly torch.topk's values and indices, ties and zeros included."""
    torch.manual_seed(0)
    x = torch.rand(3, 4, 50, 61).mul(20).round().div(20).to(dtype)  # few distinct values: many exact ties
    x[x < 0.3] = 0.
    x.requires_grad_(dtype.is_floating_point)
    val, idx = topk_nonneg(x, 17)
    ref_val, ref_idx = x.detach().topk(17, dim=-1, sorted=False)
    assert val.dtype == dtype and not val.requires_grad
    assert torch.equal(idx, ref_idx) and torch.equal(val, ref_val)


def test_predictor_reads_q_k_in_place_with_the_original_order():
    """The copy-free per-head linears give the original's coefficient logits (strided q / k of a fused qkv output),
    for the shared projection and for per-image projections (token pruning)."""
    torch.manual_seed(0)
    pred = ConnectivityPredictor(16, 3, grid_size=(4, 4), rank=5)
    with torch.no_grad():
        pred.proj_c_q.bias.normal_(0, 0.1)
        pred.proj_c_k.bias.normal_(0, 0.1)
    q, k, _ = torch.randn(2, 17, 3, 3, 16).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    for p_down in (pred.proj_n, torch.randn(2, 1, 17, 5)):
        direct = pred.proj_c_q(q[:, :, 1:].contiguous()) @ (pred.proj_c_k(k.contiguous()).transpose(-2, -1) @ p_down)
        logits = pred.coef_logits(q, k, p_down)
        assert logits.shape == (2, 3, 16, 5)
        torch.testing.assert_close(logits, direct * pred.scale, rtol=0, atol=1e-6)


def test_token_sparse_reference_config():
    """TOKEN_SPARSE_KWARGS: pruning after blocks 3, 6, 9 keeping ceil(0.7^j * 196) patch tokens."""
    model = timm.create_model('sparsifiner_deit_small', num_classes=10, embed_dim=32, depth=12, num_heads=2,
                              **TOKEN_SPARSE_KWARGS).eval()
    with torch.no_grad():
        out = model.forward_dict(torch.randn(1, 3, 224, 224))
    kept = [196 if t is None else t.shape[1] for t in out['layer_token_idx']]
    assert kept == [196] * 4 + [math.ceil(0.7 * 196)] * 3 + [math.ceil(0.49 * 196)] * 3 + [math.ceil(0.343 * 196)] * 2


def test_train_mode_gradients_straight_through(ref, official_file):
    """Train mode: same outputs as eval; the predictor gets gradient only through the straight-through mask, and
    the backbone's gradients equal those of the official detached mask (``mask_grad=False``)."""
    x = parity_input(ref)
    grads = {}
    for mask_grad in (True, False):
        model = _build_from_ref(ref, official_file(ref['state_dict']), mask_grad=mask_grad).train()
        for fused in (True, False):
            model.zero_grad()
            for b in model.blocks:
                b.attn.fused_attn = fused
            out = model.forward_dict(x)
            assert (out['logits'].detach() - ref['output']).abs().max().item() <= 1e-5
            # the patch tokens enter the loss too: the last block's predictor only acts on patch-query rows
            (out['logits'].pow(2).sum() + out['features'].pow(2).sum()).backward()
            grads[mask_grad, fused] = {n: None if p.grad is None else p.grad.clone()
                                       for n, p in model.named_parameters()}
    for fused in (True, False):
        ste, detached = grads[True, fused], grads[False, fused]
        for n in ste:
            if 'mask_predictor' in n:
                assert detached[n] is None, n
                assert ste[n] is not None and ste[n].abs().sum() > 0, n
            else:  # equal up to fp32 summation order
                assert (ste[n] - detached[n]).abs().max() <= 1e-5 * detached[n].abs().max(), n
    for n, g in grads[True, True].items():  # fused and explicit paths give the same gradients
        assert (g - grads[True, False][n]).abs().max() <= 1e-5 * g.abs().max(), n


def test_training_phases_partition_parameters():
    model = timm.create_model('sparsifiner_deit_small', num_classes=10, **SMALL)
    pred = {id(p) for p in model.predictor_parameters()}
    assert len(pred) == 2 * 6 and not pred & {id(p) for p in model.backbone_parameters()}
    model.set_training_phase('attn_recon')
    assert model.attn_recon and all(b.attn.attn_recon for b in model.blocks)
    assert all(p.requires_grad == (id(p) in pred) for p in model.parameters())
    model.set_training_phase('distill')
    assert not model.attn_recon and all(p.requires_grad == (id(p) not in pred) for p in model.parameters())
    model.set_training_phase('joint')
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="phase must be"):
        model.set_training_phase('phase3')


def _pruned_model(**kw):
    torch.manual_seed(0)
    return timm.create_model('sparsifiner_deit_small', num_classes=10, embed_dim=32, depth=5, num_heads=2,
                             token_keep_rate=0.7, token_pruning_loc=(1, 3), **kw).eval()


def test_token_pruning_keeps_top_class_attention_tokens():
    """Tokens kept after the pruning blocks: ceil(r^j * 196) with the highest head-mean class attention."""
    model = _pruned_model()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = model.forward_dict(x, return_masks=True)  # fused path: class attention computed on the side
        out_explicit = model.forward_dict(x, return_attn=True)  # explicit path: read from the attention maps
    kept1, kept2 = math.ceil(0.7 * 196), math.ceil(0.49 * 196)
    assert [None if t is None else t.shape[1] for t in out['layer_token_idx']] == [None, None, kept1, kept1, kept2]
    assert out['features'].shape == (2, kept2, 32) and out['token_idx'].shape == (2, kept2)
    # first pruning: the explicit attention map of block 1 (class-token row, head mean) picks the kept tokens
    score = out_explicit['attn'][1][:, :, 0, 1:].mean(1)
    expected = score.topk(kept1, dim=-1)[1].sort(-1)[0]
    assert torch.equal(out['layer_token_idx'][2], expected)
    assert torch.equal(out['token_idx'], out_explicit['token_idx'])
    # pruned layers: budget ceil(0.25 * 197) = 50 of the kept tokens; masks cover the kept tokens only
    assert out['masks'][2].shape == (2, 2, 1 + kept1, 1 + kept1)
    assert (out['masks'][4][:, :, 1:].sum(-1) == 50).all()
    torch.testing.assert_close(out['logits'], out_explicit['logits'], atol=1e-5, rtol=0)
    # features_only / intermediates: pruned positions are zero on the full grid
    inter = model.forward_intermediates(x, indices=[4], intermediates_only=True)[0]
    assert inter.shape == (2, 32, 14, 14)
    assert int((inter.abs().sum(1) > 0).sum()) == 2 * kept2


def test_token_pruning_train_mode_grads_every_param():
    model = _pruned_model().train()
    model(torch.randn(2, 3, 128, 128)).mean().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]


def _shapes_batch(n=16, size=64, split='train'):
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    samples = [render_sample(i, img_size=size, split=split) for i in range(n)]
    x = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in samples])
    return (x - mean) / std, torch.tensor([s.label for s in samples])


def _student_teacher(**kw):
    torch.manual_seed(0)
    kw = dict(img_size=64, num_classes=10, embed_dim=64, depth=2, num_heads=2, rank=8, **kw)
    student = timm.create_model('sparsifiner_deit_small', **kw)
    teacher = timm.create_model('sparsifiner_deit_small', attn_keep_rate=1.0, **kw)
    teacher.load_state_dict(student.state_dict())
    return student, teacher


def test_phase1_trains_predictor_and_reconstruction_loss_decreases():
    x, _ = _shapes_batch()
    student, teacher = _student_teacher()
    student.set_training_phase('attn_recon')
    student.train()
    crit = SparsifinerLoss(teacher, phase='attn_recon')
    backbone = {n: p.detach().clone() for n, p in student.named_parameters() if 'mask_predictor' not in n}
    opt = torch.optim.AdamW(student.predictor_parameters(), lr=5e-3, weight_decay=0.05)
    losses = []
    for _ in range(8):
        out = student.forward_dict(x)
        assert all(a is not None and a.requires_grad for a in out['approx_attn'])
        loss, parts = crit(x, out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    for n, p in student.named_parameters():  # the backbone is untouched in phase 1
        if n in backbone:
            assert torch.equal(p, backbone[n]), n


def test_phase2_trains_backbone_and_task_loss_decreases():
    x, y = _shapes_batch()
    student, teacher = _student_teacher()
    student.set_training_phase('distill')
    student.train()
    crit = SparsifinerLoss(teacher, phase='distill')
    pred = {n: p.detach().clone() for n, p in student.named_parameters() if 'mask_predictor' in n}
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.05)
    task = []
    for _ in range(6):
        out = student.forward_dict(x)
        assert out['keep_idx'][0] is not None  # sparse attention in phase 2
        loss, parts = crit(x, out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        task.append(parts['cls_loss'].item())
    assert task[-1] < 0.85 * task[0], task
    for n, p in student.named_parameters():  # the predictor is frozen in phase 2
        if n in pred:
            assert torch.equal(p, pred[n]) and p.grad is None, n


def test_loss_formulas():
    torch.manual_seed(0)
    a = [torch.rand(2, 2, 4, 5), torch.rand(2, 2, 4, 5)]
    t = [torch.rand(2, 2, 5, 5).softmax(-1) for _ in range(2)]
    manual = sum(((ai - ti[:, :, 1:]) ** 2).sum() for ai, ti in zip(a, t)) / 2
    torch.testing.assert_close(attn_recon_loss(a, t), manual)
    torch.testing.assert_close(attn_recon_loss(a, t, reduction='mean'), manual / a[0].numel())
    with pytest.raises(ValueError, match='layer 0 has no approximate attention'):
        attn_recon_loss([None, a[1]], t)
    s, te = torch.randn(3, 7), torch.randn(3, 7)
    p_t = te.softmax(-1)
    kl = (p_t * (p_t.log() - s.log_softmax(-1))).sum() / 3
    torch.testing.assert_close(cls_distill_loss(s, te), kl)
    fs, ft = torch.randn(3, 4, 8), torch.randn(3, 9, 8)
    idx = torch.tensor([[0, 2, 4, 8], [1, 2, 3, 4], [5, 6, 7, 8]])
    manual_tok = ((fs - torch.stack([ft[b, idx[b]] for b in range(3)])) ** 2).mean()
    torch.testing.assert_close(token_distill_loss(fs, ft, idx), manual_tok)
    y = torch.tensor([1, 2, 3])
    total, parts = distill_loss(dict(logits=s, features=fs, token_idx=idx), dict(logits=te, features=ft), y)
    expected = torch.nn.functional.cross_entropy(s, y) + 0.5 * kl + 0.5 * manual_tok
    torch.testing.assert_close(total, expected)
    soft = torch.nn.functional.one_hot(y, 7).float()
    torch.testing.assert_close(distill_loss(dict(logits=s, features=fs, token_idx=idx),
                                            dict(logits=te, features=ft), soft)[0], expected)


def test_flops_dense_equals_counted_and_sparse_matches_hand_computation():
    """keep 1.0: analytic == counted (FlopCounter) == timm DeiT-S; keep 0.25: the hand computation for DeiT-S.

    Also the parameter count of the official model."""
    dense = timm.create_model('sparsifiner_deit_small', attn_keep_rate=1.0)
    sparse = timm.create_model('sparsifiner_deit_small')
    assert count_params(sparse) == 22_251_880  # official: DeiT-S 22,050,664 + 12 predictors of 16,768
    deit_macs = count_macs(timm.create_model('deit_small_patch16_224'))
    f1 = sparsifiner_flops(dense)
    assert f1['total'] == count_macs(dense) == deit_macs
    assert f1['predictor'] == 0 and f1['mhsa_reduction'] == 0

    f = sparsifiner_flops(sparse)
    n, H, d, c, r, k, t = 197, 6, 64, 32, 32, 50, 8
    qk_av = 2 * H * (1 * n + (n - 1) * k) * d  # 9,997 kept entries per head: 7,677,696
    predictor = H * ((n - 1) * d * c + n * d * c + c * n * r + (n - 1) * c * r + (n - 1) * t * n)
    assert qk_av == 7_677_696 and predictor == 9_097_152
    assert f['attention'] == 12 * qk_av and f['predictor'] == 12 * predictor
    dense_attn = 12 * 2 * H * n * n * d
    assert f['total'] == deit_macs - dense_attn + 12 * (qk_av + predictor)
    assert abs(f['mhsa_reduction'] - (1 - (qk_av + predictor) / (2 * H * n * n * d))) < 1e-12
    assert 0.43 < f['mhsa_reduction'] < 0.44  # paper: about -44 % MHSA FLOPs at keep 0.25
    # token pruning (r = 0.7 at blocks 3, 6, 9) shrinks the count further
    sparse.token_keep_rate, sparse.token_pruning_loc = 0.7, (3, 6, 9)
    assert sparsifiner_flops(sparse)['total'] < 0.75 * f['total']

