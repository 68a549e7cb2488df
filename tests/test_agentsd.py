"""AgentSD on diffusers: token merging, parity with the official attention, patching SD-1.x / SDXL-style pipelines."""
import importlib
import importlib.util
import logging
import os
import sys
import threading
from pathlib import Path

import pytest
import torch

os.environ.setdefault('HF_HUB_OFFLINE', '1')

from vitzoo.layers.token_merging import bipartite_soft_matching_2d, grid_partition  # noqa: E402
from vitzoo.layers.workspace import Workspace  # noqa: E402

from conftest import load_parity, parity_input  # noqa: E402

from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,  # noqa: E402
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from diffusers.callbacks import MultiPipelineCallbacks  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

from vitzoo.diffusers import (AgentSDAttnProcessor, AgentSDSchedule, agentsd_self_attention, apply_patch,  # noqa: E402
                              is_patched, patch_info, remove_patch, update_patch)

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------------
# tiny offline pipelines (random weights, built from configs: no hub download)


def _tokenizer() -> CLIPTokenizer:
    from tokenizers import pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {'<|startoftext|>': 0, '<|endoftext|>': 1}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    for ch in alphabet:
        vocab.setdefault(ch + '</w>', len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _text_config(tok, **kw) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=1, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, **kw)


def _vae() -> AutoencoderKL:
    # two levels: latents are 1/2 of the image size
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                         layers_per_block=1, down_block_types=('DownEncoderBlock2D',) * 2,
                         up_block_types=('UpDecoderBlock2D',) * 2, norm_num_groups=4, sample_size=32)


def make_sd_pipeline(sd2: bool = False) -> StableDiffusionPipeline:
    """SD-1.x layout: cross-attention transformer blocks at full latent resolution (1 down + 2 up) and in the mid.

    ``sd2=True``: the SD 2.x variant (linear in/out projections of the transformers, upcast attention).
    """
    torch.manual_seed(0)
    tok = _tokenizer()
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'), up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, use_linear_projection=sd2,
        upcast_attention=sd2)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear', clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config(tok)), tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_sdxl_pipeline() -> StableDiffusionXLPipeline:
    """SDXL layout: no attention at full resolution, 2 transformer layers per block at 1/2, text_time embedding."""
    torch.manual_seed(0)
    tok = _tokenizer()
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'), up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type='text_time',
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear', steps_offset=1,
                                   timestep_spacing='leading')
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config(tok)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tok, projection_dim=32)), tokenizer=tok,
        tokenizer_2=tok, unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    # The models here are tiny: with 2 OpenMP threads on shared cores the barriers cost ~10x the compute.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def sd_pipe():
    return make_sd_pipeline()


@pytest.fixture(scope='module')
def sdxl_pipe():
    return make_sdxl_pipeline()


def generate(pipe, size: int = 64, steps: int = 2, guidance: float = 7.5, num_images: int = 1, seed: int = 0, **kw):
    gen = torch.Generator('cpu').manual_seed(seed)
    with torch.no_grad():
        return pipe(['a cat'], num_inference_steps=steps, height=size, width=size, guidance_scale=guidance,
                    num_images_per_prompt=num_images, generator=gen, output_type='pt', **kw).images


def unet_call(unet, latent, batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = (latent, latent) if isinstance(latent, int) else latent
    sample = torch.randn(batch, 4, h, w, generator=g)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    kw = {}
    if unet.config.addition_embed_type == 'text_time':
        kw['added_cond_kwargs'] = dict(text_embeds=torch.randn(batch, 32, generator=g), time_ids=torch.zeros(batch, 6))
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=ctx, **kw).sample


# ----------------------------------------------------------------------------------------------------------------------
# token merging (torch only)


def _reference_matching(metric, h, w, sx, sy, r, agent_r):
    """Literal per-sample ToMe: per token, the mean of its merge group and of its agent group (None: no agents)."""
    B, N, C = metric.shape
    dst, src = grid_partition(h, w, sx, sy)
    outs, agents = [], []
    for b in range(B):
        m = metric[b] / metric[b].norm(dim=-1, keepdim=True)
        scores = m[src] @ m[dst].T
        best, best_j = scores.max(dim=-1)
        order = sorted(range(len(src)), key=lambda i: -float(best[i]))
        rr, ar = min(r, len(src)), min(agent_r, len(src))

        def group_means(k):
            groups = {int(d): [int(d)] for d in dst}
            for rank, i in enumerate(order):
                if rank < k:
                    groups[int(dst[best_j[i]])].append(int(src[i]))
                else:
                    groups[('u', int(src[i]))] = [int(src[i])]
            per_token = torch.empty(N, C)
            for members in groups.values():
                per_token[members] = metric[b, members].mean(0)
            return per_token, len(groups)

        per_token, n_merged = group_means(rr)
        outs.append(per_token)
        per_agent, n_agents = group_means(ar)
        agents.append(per_agent if n_agents * 2 < n_merged else None)
    return torch.stack(outs), agents, n_merged


@pytest.mark.parametrize('h,w,sx,sy,ratio,agent_ratio', [
    (12, 10, 2, 2, 0.4, 0.7),  # agents: (120 - 84) * 2 < 120 - 48
    (11, 13, 3, 2, 0.3, 0.8),  # leftover rows / cols are src; r and agent_r capped at #src
    (8, 8, 2, 2, 0.5, 0.5),  # no agents
])
def test_merge_matches_literal_reference(h, w, sx, sy, ratio, agent_ratio):
    torch.manual_seed(0)
    x = torch.randn(2, h * w, 6)
    N = h * w
    tm = bipartite_soft_matching_2d(x, (h, w), sx, sy, int(N * ratio), int(N * agent_ratio))
    ref_tokens, ref_agents, n_merged = _reference_matching(x, h, w, sx, sy, int(N * ratio), int(N * agent_ratio))
    assert tm.num_merged == n_merged
    merged, agents = tm.merge(x, with_agents=True)
    assert merged.shape == (2, n_merged, 6)
    torch.testing.assert_close(tm.unmerge(merged), ref_tokens, atol=1e-6, rtol=1e-6)
    if ref_agents[0] is None:
        assert agents is None and not tm.has_agents
    else:
        for b in range(2):  # the agent rows are the distinct per-token agent-group means (order free)
            ref = torch.unique(ref_agents[b], dim=0)
            assert agents.shape[1] == ref.shape[0] == tm.num_agents
            got = agents[b][agents[b][:, 0].argsort()]
            torch.testing.assert_close(got, ref[ref[:, 0].argsort()], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('side,settings,merged,agents', [
    (64, dict(sx=4, sy=4, ratio=0.4, agent_ratio=0.95), 2458, 256),  # the official AgentSD schedule, steps 0-19
    (64, dict(sx=2, sy=2, ratio=0.4, agent_ratio=0.5), 2458, 0),  # steps >= 20: (4096 - 2048) * 2 >= 2458
    (64, dict(sx=2, sy=2, ratio=0.5, agent_ratio=0.8), 2048, 0),  # official function defaults
    (96, dict(sx=4, sy=4, ratio=0.4, agent_ratio=0.95), 5530, 576),
    (128, dict(sx=4, sy=4, ratio=0.4, agent_ratio=0.95), 9831, 1024),
])
def test_token_counts_table(side, settings, merged, agents):
    N = side * side
    x = torch.randn(1, N, 4)
    tm = bipartite_soft_matching_2d(x, (side, side), settings['sx'], settings['sy'], int(N * settings['ratio']),
                                    int(N * settings['agent_ratio']), generator=torch.Generator().manual_seed(0))
    assert (tm.num_merged, tm.num_agents) == (merged, agents)
    out = tm.merge(x, with_agents=True)
    assert out[0].shape[1] == merged and (out[1] is None if agents == 0 else out[1].shape[1] == agents)


def test_identity_merge_and_errors():
    x = torch.randn(3, 64, 4)
    tm = bipartite_soft_matching_2d(x, (8, 8), 2, 2, 0, 50)
    assert tm.is_identity and tm.merge(x) is x and tm.unmerge(x) is x
    assert tm.merge(x, with_agents=True)[1] is None  # no batch split (official defect 4)
    with pytest.raises(ValueError, match='8x9'):
        bipartite_soft_matching_2d(x, (8, 9), 2, 2, 10)
    tm = bipartite_soft_matching_2d(x, (8, 8), 2, 2, 10)
    with pytest.raises(ValueError, match='merged tokens'):
        tm.unmerge(x)


def test_random_partition_one_dst_per_cell():
    seen = set()
    for seed in range(4):
        dst, src = grid_partition(9, 8, 2, 3, generator=torch.Generator().manual_seed(seed))
        assert dst.numel() == 3 * 4 and src.numel() == 72 - 12
        assert torch.equal(torch.sort(torch.cat([dst, src])).values, torch.arange(72))
        cells = {((int(p) // 8) // 3, (int(p) % 8) // 2) for p in dst}
        assert len(cells) == 12
        seen.add(tuple(dst.tolist()))
        again, _ = grid_partition(9, 8, 2, 3, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(dst, again)
    assert len(seen) > 1


# ----------------------------------------------------------------------------------------------------------------------
# parity with the official AgentSD attention


@pytest.mark.parametrize('fused', [True, False])
def test_parity_official_attention(fused):
    ref = load_parity('agentsd_attention.pt')
    kw = ref['official_kwargs']
    x = parity_input(ref)
    B, N, C = x.shape
    attn = Attention(query_dim=C, heads=kw['heads'], dim_head=kw['dim_head'], bias=False, out_bias=True).eval()
    norm = torch.nn.LayerNorm(C)
    sd = ref['state_dict']
    norm.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith('norm1.')})
    attn.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith('attn1.')})
    hw = tuple(kw['latent_hw'])
    tm = bipartite_soft_matching_2d(x, hw, kw['sx'], kw['sy'], int(N * kw['ratio']), int(N * kw['agent_ratio']))
    assert (tm.r, tm.agent_r, tm.num_merged, tm.num_agents) == (
        ref['r'], ref['agent_r'], ref['num_merged_tokens'], ref['num_agent_tokens'])
    with torch.no_grad():
        out = agentsd_self_attention(attn, norm(x), tm, kw['k_scale2'], kw['k_shortcut'], kw['attn_precision'],
                                     fused=fused)
    assert (out - ref['output']).abs().max().item() <= ref['atol_hint']
    # wrapped projections (LoRA / PEFT style) are not fused into one GEMM: same result through the module calls
    wrapped = type('WrappedLinear', (torch.nn.Linear,), {})
    lin = wrapped(C, C, bias=False)
    lin.load_state_dict(attn.to_q.state_dict())
    attn.to_q, original_q = lin, attn.to_q
    with torch.no_grad():
        out_wrapped = agentsd_self_attention(attn, norm(x), tm, kw['k_scale2'], kw['k_shortcut'], fused=fused)
    attn.to_q = original_q
    assert (out_wrapped - ref['output']).abs().max().item() <= ref['atol_hint']
    # the autograd path computes the same and gives every projection a gradient
    out_grad = agentsd_self_attention(attn, norm(x), tm, kw['k_scale2'], kw['k_shortcut'], fused=fused)
    out_grad.square().sum().backward()
    assert (out_grad.detach() - ref['output']).abs().max().item() <= ref['atol_hint']  # unfused projections
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn.parameters())


def test_workspace_reuse_is_exact():
    torch.manual_seed(0)
    attn = Attention(query_dim=64, heads=4, dim_head=16, bias=True, out_bias=True).eval()
    ws, cache = Workspace(), {}
    ptrs = None
    for agent_ratio in (0.8, 0.8, 0.0):  # agents twice (slots reused), then the tomesd-equivalent mode
        x = torch.randn(2, 256, 64)
        tm = bipartite_soft_matching_2d(x, (16, 16), 2, 2, int(256 * 0.4), int(256 * agent_ratio))
        assert tm.has_agents == (agent_ratio > 0)
        with torch.no_grad():
            ref = agentsd_self_attention(attn, x, tm)
            out = agentsd_self_attention(attn, x, tm, cache=cache, workspace=ws)
        assert torch.equal(out, ref)
        slots = {k: t.data_ptr() for k, t in ws.slots().items()}
        assert {'merge.sums', 'merge.added', 'attn.qkv', 'attn.proj'} <= set(slots)
        assert out.data_ptr() not in slots.values()  # the result never aliases a slot
        if ptrs is not None and tm.has_agents:
            assert slots == ptrs  # same shapes: the same memory, no new allocation
        ptrs = slots
    # with autograd on nothing goes through the workspace (saved tensors must not be overwritten)
    fresh = Workspace()
    out = agentsd_self_attention(attn, x, tm, workspace=fresh)
    out.sum().backward()
    assert fresh.nbytes == 0 and attn.to_q.weight.grad is not None
    # slots follow shape changes; non-CPU tensors are never kept (their allocators cache already)
    a = ws.get('t', (3, 4), x)
    assert ws.get('t', (3, 4), x) is a and ws.get('t', (5,), x).shape == (5,)
    meta = torch.empty(0, device='meta')
    assert ws.get('m', (2,), meta) is not ws.get('m', (2,), meta) and 'm' not in ws.slots()
    # slots are per thread: the same name in another thread is another tensor
    other = []
    worker = threading.Thread(target=lambda: other.append(ws.get('t', (5,), x)))
    worker.start()
    worker.join()
    assert other[0].data_ptr() != ws.get('t', (5,), x).data_ptr() and 't' in ws.slots()
    ws.clear()
    assert ws.nbytes == 0


# ----------------------------------------------------------------------------------------------------------------------
# patching pipelines


def _processors(pipe):
    return [p for p in pipe.unet.attn_processors.values() if isinstance(p, AgentSDAttnProcessor)]


def test_sd_apply_generate_remove_bit_identical(sd_pipe):
    before = dict(sd_pipe.unet.attn_processors)
    base = generate(sd_pipe, num_images=2)  # CFG: UNet batch 4
    apply_patch(sd_pipe, seed=0)
    assert is_patched(sd_pipe) and len(_processors(sd_pipe)) == 4  # every self-attention: 1 down, 2 up, 1 mid
    patched = generate(sd_pipe, num_images=2)
    info = patch_info(sd_pipe)
    apply_patch(sd_pipe, seed=0, ratio=0.3)  # re-applying replaces the settings
    assert len(_processors(sd_pipe)) == 4
    state = sd_pipe.unet._agentsd_state
    generate(sd_pipe, num_images=1)
    assert state.workspace.nbytes > 0  # the processors' shared scratch tensors ...
    remove_patch(sd_pipe)
    assert state.workspace.nbytes == 0  # ... are freed by remove_patch
    assert not is_patched(sd_pipe)
    assert all(sd_pipe.unet.attn_processors[k] is v for k, v in before.items())
    assert torch.equal(generate(sd_pipe, num_images=2), base)
    assert patched.shape == base.shape == (2, 3, 64, 64) and torch.isfinite(patched).all()
    assert (patched - base).abs().max() > 1e-4
    full_res = {k: v for k, v in info.items() if not k.startswith('mid_block')}
    assert len(full_res) == 3 and all(v['mode'] == 'agent' and v['tokens'] == 1024 for v in full_res.values())
    assert all(v['merged'] == 615 and v['agents'] == 64 for v in full_res.values())  # 1024 - int(409.6); 8 x 8 cells
    assert info['mid_block.attentions.0.transformer_blocks.0.attn1']['mode'] == 'off'  # downsample 2 > 1


@pytest.mark.parametrize('latent,merged,agents', [(64, 2458, 256), (96, 5530, 576)])
def test_sd_token_counts_per_block(sd_pipe, latent, merged, agents):
    apply_patch(sd_pipe, use_rand=False)
    try:
        out = unet_call(sd_pipe.unet, latent)
        info = patch_info(sd_pipe)
    finally:
        remove_patch(sd_pipe)
    assert torch.isfinite(out).all()
    patched = {k: v for k, v in info.items() if v['mode'] != 'off'}
    assert sorted(patched) == ['down_blocks.0.attentions.0.transformer_blocks.0.attn1',
                               'up_blocks.1.attentions.0.transformer_blocks.0.attn1',
                               'up_blocks.1.attentions.1.transformer_blocks.0.attn1']
    for v in patched.values():
        assert (v['tokens'], v['merged'], v['agents'], v['hw'], v['mode']) == (
            latent * latent, merged, agents, (latent, latent), 'agent')


def test_non_square_latent_not_divisible_by_cells(sd_pipe):
    apply_patch(sd_pipe, use_rand=True, seed=0)
    try:
        out = unet_call(sd_pipe.unet, (36, 42), batch=2)
        info = patch_info(sd_pipe)
    finally:
        remove_patch(sd_pipe)
    assert out.shape == (2, 4, 36, 42) and torch.isfinite(out).all()
    full_res = [v for k, v in info.items() if not k.startswith('mid')]
    # N = 1512, r = 604; 9 x 10 dst cells (the last 2 columns are src), agent_r = #src = 1422
    assert all((v['hw'], v['merged'], v['agents'], v['mode']) == ((36, 42), 908, 90, 'agent') for v in full_res)


def test_sdxl_patch(sdxl_pipe, caplog):
    with caplog.at_level(logging.WARNING):
        apply_patch(sdxl_pipe)  # max_downsample=1: SDXL has no full-resolution attention
    assert 'max_downsample=2' in caplog.text
    remove_patch(sdxl_pipe)
    base = generate(sdxl_pipe)
    apply_patch(sdxl_pipe, max_downsample=2, seed=0)
    try:
        patched = generate(sdxl_pipe)
        info32 = patch_info(sdxl_pipe)
        unet_call(sdxl_pipe.unet, 128)
        info128 = patch_info(sdxl_pipe)
    finally:
        remove_patch(sdxl_pipe)
    assert torch.equal(generate(sdxl_pipe), base)
    assert torch.isfinite(patched).all() and (patched - base).abs().max() > 1e-4
    assert len(info32) == 8  # 2 layers x (1 down + 2 up + 1 mid)
    assert all(v['mode'] == 'agent' and (v['tokens'], v['merged'], v['agents']) == (256, 154, 16)
               for v in info32.values())
    assert all((v['tokens'], v['merged'], v['agents'], v['downsample']) == (4096, 2458, 256, 2)
               for v in info128.values())


def test_seed_makes_merging_deterministic(sd_pipe):
    unet = sd_pipe.unet
    apply_patch(sd_pipe, seed=3)
    try:
        torch.manual_seed(1)
        a = unet_call(unet, 32, batch=2)  # even batch: random dst positions
        torch.manual_seed(2)  # the global RNG does not matter
        b = unet_call(unet, 32, batch=2)  # repeated calls match too (re-seeded from (seed, timestep))
        apply_patch(sd_pipe, seed=4)
        c = unet_call(unet, 32, batch=2)
        apply_patch(sd_pipe, seed=4, use_rand=False)
        d = unet_call(unet, 32, batch=2)
        apply_patch(sd_pipe, seed=5, use_rand=False)
        e = unet_call(unet, 32, batch=2)
    finally:
        remove_patch(sd_pipe)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # another seed, other dst positions
    assert torch.equal(d, e)  # without random dst the seed is irrelevant


def test_ratio_zero_is_a_no_op(sd_pipe):
    base = [unet_call(sd_pipe.unet, 32, batch=b) for b in (2, 3)]
    apply_patch(sd_pipe, ratio=0.0)
    try:
        out = [unet_call(sd_pipe.unet, 32, batch=b) for b in (2, 3)]
        info = patch_info(sd_pipe)
    finally:
        remove_patch(sd_pipe)
    assert all(torch.equal(o, r) for o, r in zip(out, base))
    assert all(v['mode'] == 'off' for v in info.values())


def test_tome_mode_and_fused_equals_explicit(sd_pipe):
    unet = sd_pipe.unet
    outs = {}
    apply_patch(sd_pipe, agent_ratio=0.0, use_rand=False)  # tomesd-equivalent
    outs['tome'] = unet_call(unet, 32, batch=2)
    info = patch_info(sd_pipe)
    for fused in (True, False):
        apply_patch(sd_pipe, use_rand=False)
        for p in _processors(sd_pipe):
            p.fused_attn = fused
        outs[fused] = unet_call(unet, 32, batch=2)
    remove_patch(sd_pipe)
    assert all(v['mode'] == 'tome' and v['merged'] == 615 and v['agents'] == 0
               for k, v in info.items() if not k.startswith('mid'))
    torch.testing.assert_close(outs[True], outs[False], atol=1e-5, rtol=1e-5)
    assert (outs['tome'] - outs[True]).abs().max() > 1e-4


def test_merge_crossattn_and_mlp(sd_pipe):
    base = unet_call(sd_pipe.unet, 32, batch=2)
    outs = {}
    for key, kw in (('attn', {}), ('cross', dict(merge_crossattn=True)), ('mlp', dict(merge_mlp=True))):
        apply_patch(sd_pipe, use_rand=False, **kw)
        outs[key] = unet_call(sd_pipe.unet, 32, batch=2)
    remove_patch(sd_pipe)
    assert torch.equal(unet_call(sd_pipe.unet, 32, batch=2), base)
    for key in ('cross', 'mlp'):
        assert torch.isfinite(outs[key]).all() and (outs[key] - outs['attn']).abs().max() > 1e-5


@pytest.mark.parametrize('dtype,sd2', [(torch.bfloat16, False), (torch.float16, True)])
def test_half_precision_finite(dtype, sd2):
    pipe = make_sd_pipeline(sd2=sd2).to(dtype=dtype)
    apply_patch(pipe, seed=0)
    out = generate(pipe, guidance=7.5)
    info = patch_info(pipe)
    unet_out = {}
    for precision in (None, 'fp32'):  # attn_precision='fp32' also covers the non-agent fallback
        for agent_ratio in (0.95, 0.0):
            apply_patch(pipe, seed=0, attn_precision=precision, agent_ratio=agent_ratio)
            unet_out[precision, agent_ratio] = _half_unet_call(pipe.unet, dtype)
    remove_patch(pipe)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert any(v['mode'] == 'agent' for v in info.values())
    assert all(o.dtype == dtype and torch.isfinite(o).all() for o in unet_out.values())
    # fp32 attention changes the rounding only
    torch.testing.assert_close(unet_out[None, 0.95].float(), unet_out['fp32', 0.95].float(), atol=0.1, rtol=0.1)


def _half_unet_call(unet, dtype):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 32, 32, generator=g).to(dtype)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(dtype)
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=ctx).sample


def test_recommended_schedule_callback(sd_pipe):
    modes = []

    def record(pipe, step, t, kwargs):
        modes.append({v['mode'] for k, v in patch_info(pipe).items() if not k.startswith('mid')})
        return kwargs

    apply_patch(sd_pipe, seed=0)
    try:
        schedule = AgentSDSchedule(switch_step=1)
        generate(sd_pipe, steps=3, callback_on_step_end=MultiPipelineCallbacks([_Recorder(record), schedule]))
        after = update_patch(sd_pipe)
        modes_frac = []
        generate(sd_pipe, steps=2, callback_on_step_end=MultiPipelineCallbacks(
            [_Recorder(lambda p, s, t, k: (modes_frac.append(patch_info(p)['up_blocks.1.attentions.0.transformer_'
                                                                            'blocks.0.attn1']['mode']), k)[1]),
             AgentSDSchedule(switch_step=0.5)]))
    finally:
        remove_patch(sd_pipe)
    # step 0: sx=sy=4 + agents; steps >= 1: sx=sy=2, agent_ratio 0.5 -> 512 agents, 1024 >= 615: plain ToMe
    assert modes == [{'agent'}, {'tome'}, {'tome'}]
    assert (after['sx'], after['agent_ratio']) == (4, 0.95)  # reset for the next call
    assert modes_frac == ['agent', 'tome']  # switch at round(0.5 * 2) = 1


class _Recorder:
    tensor_inputs = []

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, pipe, step, t, kwargs):
        return self.fn(pipe, step, t, kwargs)


def test_bad_inputs(sd_pipe):
    class NoUnetPipeline:
        components = {}
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match='no `unet`'):
        apply_patch(NoUnetPipeline())
    with pytest.raises(TypeError, match='BasicTransformerBlock'):
        apply_patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match='expected a diffusers pipeline'):
        apply_patch('unet')
    assert remove_patch(sd_pipe) is sd_pipe and not is_patched(sd_pipe)  # removing when not applied: no-op
    assert patch_info(sd_pipe) == {}
    with pytest.raises(RuntimeError, match='not patched'):
        update_patch(sd_pipe, ratio=0.2)
    with pytest.raises(RuntimeError, match='not patched'):
        AgentSDSchedule()(sd_pipe, 0, 1, {})
    with pytest.raises(ValueError, match='ratio'):
        apply_patch(sd_pipe, ratio=1.0)
    with pytest.raises(ValueError, match='attn_precision'):
        apply_patch(sd_pipe, attn_precision='fp16')
    with pytest.raises(ValueError, match='sx'):
        apply_patch(sd_pipe, sx=0)
    assert not is_patched(sd_pipe)  # a rejected apply leaves nothing behind
    apply_patch(sd_pipe)
    with pytest.raises(ValueError, match='merge_mlp'):
        update_patch(sd_pipe, merge_mlp=True)
    remove_patch(sd_pipe)
    with pytest.raises(ValueError, match='switch_step'):
        AgentSDSchedule(switch_step=1.5)


def test_missing_diffusers_gives_clear_error(monkeypatch):
    for name in [m for m in sys.modules if m == 'vitzoo.diffusers' or m.startswith('vitzoo.diffusers.')]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, 'diffusers', None)
    with pytest.raises(ImportError, match=r'pip install vitzoo\[sd\]'):
        importlib.import_module('vitzoo.diffusers')
    # the merging layer is torch only
    monkeypatch.delitem(sys.modules, 'vitzoo.layers.token_merging')
    assert hasattr(importlib.import_module('vitzoo.layers.token_merging'), 'bipartite_soft_matching_2d')


def test_sd_generate_tool(sd_pipe, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location('_vitzoo_tool_sd_generate', REPO / 'tools' / 'sd_generate.py')
    sd_generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sd_generate)
    folder = tmp_path / 'tiny-sd'
    sd_pipe.save_pretrained(folder)
    out = tmp_path / 'grid.png'
    res = sd_generate.main([str(folder), '--steps', '2', '--switch-step', '1', '--height', '64', '--width', '64',
                            '--batch', '2', '--tome', '--out', str(out), '--device', 'cpu'])
    text = capsys.readouterr().out
    from PIL import Image
    im = Image.open(out)
    assert im.size == (3 * 64 + 2 * 4, 2 * 64 + 4)  # columns baseline / AgentSD / ToMe, one row per image
    assert set(res['times']) == {'baseline', 'agentsd', 'tome'} and all(t > 0 for t in res['times'].values())
    assert 'agentsd' in text and 's/img' in text
    with pytest.raises(SystemExit):
        sd_generate.main([str(tmp_path / 'missing')])
    with pytest.raises(SystemExit) as e:
        sd_generate.parse_args(['--help'])
    assert e.value.code == 0 and '--agent-ratio' in capsys.readouterr().out
