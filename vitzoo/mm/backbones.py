"""OpenMMLab (mmengine / mmdet 3.x / mmseg 1.x) backbones over the vitzoo timm models, registered once for both.

The backbones are thin wrappers: each holds the vitzoo timm model (``self.model``, built with
``timm.create_model``) and returns its stage maps (the agent families through ``forward_intermediates``), so the
attention exists only in ``vitzoo.layers`` / ``vitzoo.models``. They are registered in mmengine's root ``MODELS``
registry, which mmdet's and mmseg's registries search through their parent chain (``type='AgentPVT'`` works in
both). ``TAPFAN`` (the TAP-FAN hybrid of TAP + ADL, official ``TAPADL_FAN/segmentation``) is documented on its class;
its ADL segmentor ``ADLEncoderDecoder`` lives in :mod:`vitzoo.mm.seg` (mmseg only).

Dense-task behaviour of the official downstream backbones (``downstream/{detection,segmentation}``):

- agent attention is global over the whole (padded) stage map; its biases are bilinearly resized to that map at run
  time (the vitzoo core always does this);
- ``downstream_agent_shapes``: stage i pools an ``(ph, pw)`` agent grid instead of the classification ``p x p`` one,
  and every agent bias is bilinearly resized along its agent axis (``AgentAttention.agent_hw``). PVT uses
  ``(12,12),(16,16),(28,28),(28,28)``, Swin ``(9,9),(12,12),(14,14),(7,7)``. With the classification grid the
  features are exactly those of the timm model;
- Swin window ('B') blocks shift on every odd block (the official downstream removes the classification model's
  "map no larger than the window" clamp; vitzoo still uses one unshifted window on an axis no longer than the window,
  which only matters for maps of 7 tokens or fewer) and a LayerNorm ``norm{i}`` follows each Swin output (CSwin too);
- inputs: Swin / CSwin zero-pad the image bottom/right to a multiple of the patch size, PVT drops the remainder
  (the official stride-4 patch conv floors).

Deviation: vitzoo's Swin window blocks mask zero-padded keys (the official downstream lets them take part), so maps
that are not multiples of 7 give slightly different features than the official detector with the same weights.

Pretrained ImageNet weights: ``init_cfg=dict(type='Pretrained', checkpoint=PATH_OR_URL)`` accepts official or vitzoo
classification checkpoints (mapped with the family's ``checkpoint_filter_fn``) and full mm checkpoints of these
backbones (``backbone.`` keys, or any ``prefix=``). Local files are read weights-only
(:func:`vitzoo.mm.load_checkpoint_file`).

Released official detection / segmentation checkpoints (mmdet 2.x / mmseg 0.x, official backbone key names such as
``backbone.patch_embed1.*``, ``backbone.layers.0.downsample.*``, ``backbone.norm0.*``) load wherever a state dict is
loaded into a backbone (``load_from``, ``Runner.load_checkpoint``, ``tools/mm_test.py``, ``load_state_dict``):
``_TimmBackbone._load_from_state_dict`` maps them with :meth:`_TimmBackbone.convert_official_state_dict`, the same
code ``init_cfg`` uses, and raises :class:`~vitzoo.models.CheckpointError` naming the keys that do not fit, where
mmengine's non-strict load would only warn and leave a randomly initialised backbone.

Imported by :mod:`vitzoo.mm` (and so by ``vitzoo.mmdet`` / ``vitzoo.mmseg``, the modules mm ``custom_imports``
name); importing ``vitzoo`` itself never imports mmengine.
"""
from typing import Any, ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from mmengine.registry import MODELS

import timm

import vitzoo.models  # noqa: F401  (registers the vitzoo timm models)
from vitzoo.layers.agent_attention import AgentAttention
from vitzoo.models import CheckpointError, agent_cswin, agent_pvt, agent_swin
from vitzoo.models import fan as fan_models
from .checkpoint import PretrainedInitMixin, fit_problems, read_state_dict

__all__ = ['AgentPVT', 'AgentSwinTransformer', 'AgentCSwin', 'TAPFAN']


class _TimmBackbone(PretrainedInitMixin, BaseModule):
    """Shared part of the backbones: build the vitzoo timm model, load weights, keep frozen parts in eval mode."""

    _filter_fn = None        # the family's checkpoint_filter_fn
    _default_model = ''
    _out_kind = 'stage'      # what out_indices index (for the error message)
    _pad_input = True        # zero-pad to a multiple of the patch size (False: crop, PVT's floor)
    _patch = 4

    def __init__(
            self,
            model_name: Optional[str],
            create_kwargs: Dict[str, Any],
            out_indices: Sequence[int],
            frozen_stages: int = -1,
            norm_eval: bool = False,
            pretrained: Optional[str] = None,
            init_cfg: Optional[Union[dict, List[dict]]] = None,
    ):
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or min(out_indices) < 0 or max(out_indices) > 3:
            raise ValueError(f'{type(self).__name__}: out_indices must be {self._out_kind} indices in 0..3, '
                             f'got {out_indices}')
        self.out_indices = out_indices
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError(f'{type(self).__name__}: pass pretrained or init_cfg, not both')
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        self.out_indices = out_indices
        self.model_name = model_name or self._default_model
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        for k in ('num_classes', 'global_pool', 'features_only', 'pretrained_cfg_overlay'):
            create_kwargs.pop(k, None)  # classification-only arguments of the official configs
        self._create_kwargs = {**create_kwargs, 'num_classes': 0}
        self.model = timm.create_model(self.model_name, pretrained=False, **self._create_kwargs)
        # 'official' / 'vitzoo': the key layout of the last state dict loaded into the backbone (None: none yet)
        self.loaded_layout: Optional[str] = None

    def _freeze_stages(self) -> None:
        pass

    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        p = self._patch
        H, W = x.shape[-2:]
        if self._pad_input:
            if H % p or W % p:
                x = F.pad(x, (0, (-W) % p, 0, (-H) % p))
        elif H % p or W % p:
            x = x[..., :H - H % p, :W - W % p]
        return x

    def train(self, mode: bool = True) -> 'nn.Module':
        """Train mode that keeps frozen stages (and, with ``norm_eval``, BatchNorms) in eval mode."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # weights
    def _complete_classification(self, state_dict: Dict[str, torch.Tensor],
                                 full: nn.Module) -> Dict[str, torch.Tensor]:
        """Fill the final norm (``norm.*``) a checkpoint lacks, before the family's filter checks every key.

        The official dense backbones have none (LeapLabTHU/Agent-Attention ``downstream/*/backbones/agent_swin.py``,
        guoyongcs/TAPADL ``TAPADL_FAN/segmentation/mmseg/models/backbones/tap_fan.py``), and no wrapper uses it (pruned,
        or an Identity in TAPFAN), so the filled tensors are dropped again after the check.
        """
        if any(k.startswith('norm.') for k in state_dict):
            return state_dict
        used = self.model.state_dict()
        fill = {k: v for k, v in full.state_dict().items() if k.startswith('norm.') and k not in used}
        return {**state_dict, **fill} if fill else state_dict

    def _extra_modules(self) -> List[str]:
        """Names of the wrapper's own modules next to ``model`` (the output norms ``norm{i}``)."""
        return [name for name, _ in self.named_children() if name != 'model']

    def convert_official_state_dict(
            self, state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
        """Map a backbone state dict with official key names (classification or dense) onto this wrapper's keys.

        The one mapping of official weights, used by :meth:`load_pretrained` and by every ``load_state_dict`` into
        the backbone: the family's ``checkpoint_filter_fn`` renames (and resizes) the tensors against an unpruned copy
        of the timm model and checks every key and shape (:class:`~vitzoo.models.CheckpointError` names the key);
        the classifier (``head.*``) and, when absent, the final norm are not required. The official dense
        backbones' output norms (``norm{i}`` of Agent-Swin) have the wrapper's names and are kept as they are.
        vitzoo classification checkpoints (vitzoo key names) pass through the same filter.

        Args:
            state_dict: Keys relative to the backbone (a detector checkpoint's ``backbone.`` prefix removed).

        Returns:
            The tensors under this module's key names (``model.*``, ``norm{i}.*``), and the names of the tensors this
            backbone does not build (final norm, stages after the last output, TAP-FAN's unused class attention).
        """
        extra = tuple(f'{n}.' for n in self._extra_modules())
        own_extra = {k: v for k, v in state_dict.items() if extra and k.startswith(extra)}
        rest = {k: v for k, v in state_dict.items() if k not in own_extra and not k.startswith('head.')}
        full = timm.create_model(self.model_name, pretrained=False, **self._create_kwargs)
        rest = type(self)._filter_fn(self._complete_classification(rest, full), full)
        used = self.model.state_dict()
        dropped = [k for k in rest if k not in used]
        out = {f'model.{k}': v for k, v in rest.items() if k in used}
        out.update(own_extra)
        return out, dropped

    def _check_fit(self, state_dict: Dict[str, torch.Tensor], where: str,
                   allow_missing: Sequence[str] = ()) -> None:
        """One :class:`~vitzoo.models.CheckpointError` naming every missing / unexpected / mis-shaped key."""
        problems = fit_problems(self.state_dict(), state_dict, allow_missing)
        if problems:
            raise CheckpointError(f'{type(self).__name__} ({self.model_name}): {where} does not fit the backbone: '
                                  + '; '.join(problems))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # Every load into the backbone comes through here (nn.Module.load_state_dict and mmengine's load_state_dict,
        # so load_from, Runner.load_checkpoint / resume, tools/mm_test.py and init_cfg all do): official-layout
        # tensors under ``prefix`` (a released detector / segmentor checkpoint) are mapped onto the wrapper's names
        # here, and tensors that still do not fit raise, where a non-strict mm load would only warn and leave a
        # randomly initialised backbone. A state dict with no tensor under ``prefix`` is left to the caller.
        keys = [k for k in state_dict if k.startswith(prefix)]
        if keys:
            sub = {k[len(prefix):]: state_dict[k] for k in keys}
            layout, dropped = 'vitzoo', []
            if not any(k.startswith('model.') for k in sub):
                sub, dropped = self.convert_official_state_dict(sub)
                layout = 'official'
            self._check_fit(sub, f'the state dict under {prefix!r} ({layout} layout)')
            for k in keys:
                del state_dict[k]
            state_dict.update({prefix + k: v for k, v in sub.items()})
            self.loaded_layout = layout
            if layout == 'official':
                MMLogger.get_current_instance().info(
                    f'{type(self).__name__}: mapped the {len(keys)} official-layout tensors under {prefix!r} onto '
                    f'{prefix}model.* ({len(sub)} loaded, {len(dropped)} not built here: {dropped[:4]})')
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def load_pretrained(self, checkpoint: str, prefix: Optional[str] = None) -> None:
        """Load a classification (official / vitzoo) or mm (``backbone.``-prefixed, official or vitzoo) checkpoint.

        Args:
            checkpoint: Path or URL.
            prefix: Take the keys under this prefix (mm style, e.g. 'backbone.'); detected automatically for full
                detector / segmentor checkpoints.
        """
        logger = MMLogger.get_current_instance()
        state_dict, _ = read_state_dict(checkpoint, prefix, 'backbone.')
        if any(k.startswith('model.') for k in state_dict):
            # a checkpoint of this wrapper: _load_from_state_dict checks that every key fits
            self.load_state_dict(state_dict, strict=True)
            logger.info(f'{type(self).__name__}: loaded {checkpoint}')
            return
        # official / classification layout: every tensor of the model is required; the output norms only as a set
        # (a classification checkpoint has none: they keep their init; an official Swin detector has all four)
        state_dict, dropped = self.convert_official_state_dict(state_dict)
        extra = [n for n in self._extra_modules() if any(k.startswith(f'{n}.') for k in state_dict)]
        self._check_fit(state_dict, f'checkpoint {checkpoint}',
                        allow_missing=() if extra else tuple(f'{n}.' for n in self._extra_modules()))
        self.model.load_state_dict({k[6:]: v for k, v in state_dict.items() if k.startswith('model.')}, strict=True)
        for name in extra:
            n = len(name) + 1
            getattr(self, name).load_state_dict(
                {k[n:]: v for k, v in state_dict.items() if k.startswith(f'{name}.')}, strict=True)
        norms = f'output norms loaded: {extra}' if extra else 'output norms keep their init'
        logger.info(f'{type(self).__name__}: loaded checkpoint {checkpoint} through the family filter '
                    f'({len(state_dict)} tensors; not used: {len(dropped)}; {norms})')


class _AgentBackbone(_TimmBackbone):
    """Common part: build the timm model, set the agent grids, run ``forward_intermediates``, load weights."""

    _default_out_norms = False

    def __init__(
            self,
            model_name: Optional[str] = None,
            img_size: Union[int, Tuple[int, int]] = 224,
            out_indices: Sequence[int] = (0, 1, 2, 3),
            frozen_stages: int = -1,
            downstream_agent_shapes: Optional[Sequence[Sequence[int]]] = None,
            out_norms: Optional[bool] = None,
            drop_path_rate: float = 0.1,
            with_cp: bool = False,
            norm_eval: bool = False,
            pretrained: Optional[str] = None,
            init_cfg: Optional[Union[dict, List[dict]]] = None,
            **model_kwargs,
    ):
        create_kwargs = {**self._model_defaults(), **self._model_kwargs(model_kwargs), 'img_size': img_size,
                         'drop_path_rate': drop_path_rate}
        super().__init__(model_name, create_kwargs, out_indices, frozen_stages, norm_eval, pretrained, init_cfg)
        self.num_stages = len(self._stages())
        self._prune()
        if with_cp:
            self.model.set_grad_checkpointing(True)
        channels = [f['num_chs'] for f in self.model.feature_info]
        self.num_features = [channels[i] for i in self.out_indices]
        self.downstream_agent_shapes = self._set_agent_shapes(downstream_agent_shapes)
        self.out_norms = self._default_out_norms if out_norms is None else out_norms
        if self.out_norms:
            for i in self.out_indices:
                self.add_module(f'norm{i}', nn.LayerNorm(channels[i]))
        self._freeze_stages()

    # family hooks
    def _model_defaults(self) -> Dict[str, Any]:
        return {}

    def _model_kwargs(self, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        return kwargs

    # where the family's timm model keeps its stage list and its patch embedding (``get_submodule`` paths)
    _stages_path = 'stages'
    _stem_path = 'patch_embed'

    def _stages(self) -> nn.Sequential:
        return self.model.get_submodule(self._stages_path)

    def _stem(self) -> nn.Module:
        return self.model.get_submodule(self._stem_path)

    def _prune(self) -> None:
        # Drop the classifier, the final norm and stages after the last output (no unused parameters under DDP).
        self.model.prune_intermediate_layers(list(self.out_indices), prune_norm=True, prune_head=True)

    def _set_agent_shapes(self, shapes: Optional[Sequence[Sequence[int]]]) -> List[Optional[Tuple[int, int]]]:
        stages = self._stages()
        out: List[Optional[Tuple[int, int]]] = []
        for i, stage in enumerate(stages):
            attns = [m for m in stage.modules() if isinstance(m, AgentAttention)]
            if shapes is None or i >= len(shapes) or shapes[i] is None:
                out.append(tuple(attns[0].agent_hw) if attns else None)
                continue
            hw = tuple(int(s) for s in (shapes[i] if isinstance(shapes[i], (list, tuple)) else (shapes[i],) * 2))
            if len(hw) != 2 or min(hw) < 1:
                raise ValueError(f'{type(self).__name__}: downstream_agent_shapes[{i}] must be (h, w), got {shapes[i]}')
            for m in attns:
                m.agent_hw = hw
            out.append(hw if attns else None)
        return out

    def _freeze_stages(self) -> None:
        # mmdet Swin convention: frozen_stages >= 0 freezes the stem, k > 0 also stages 0..k-1 and their out norms
        if self.frozen_stages < 0:
            return
        stages = self._stages()
        modules = [self._stem()] + [stages[i] for i in range(min(self.frozen_stages, len(stages)))]
        modules += [getattr(self, f'norm{i}') for i in range(self.frozen_stages) if hasattr(self, f'norm{i}')]
        params = [p for m in modules for p in m.parameters()] + self._stem_params()
        for m in modules:
            m.eval()
        for p in params:
            p.requires_grad = False

    def _stem_params(self) -> List[nn.Parameter]:
        return []

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Stage maps (B, C_i, H_i, W_i) for ``out_indices``."""
        feats = self.model.forward_intermediates(
            self._prepare_input(x), indices=list(self.out_indices), stop_early=True, intermediates_only=True)
        outs = []
        for i, f in zip(self.out_indices, feats):
            if self.out_norms:
                f = getattr(self, f'norm{i}')(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()
            outs.append(f)
        return tuple(outs)


@MODELS.register_module()
class AgentPVT(_AgentBackbone):
    """Agent-PVT backbone (official ``AgentPVT``): 4 stage maps at strides 4, 8, 16, 32, no output norms.

    Args:
        model_name: vitzoo timm model ('agent_pvt_tiny', '_small', '_medium', '_large').
        img_size: Classification resolution the checkpoint was trained at (sizes the bias / position tables).
        out_indices: Stages to return.
        frozen_stages: Freeze stages 0..frozen_stages (-1: none).
        downstream_agent_shapes: Agent grid per stage, e.g. ((12, 12), (16, 16), (28, 28), (28, 28)); None keeps
            the classification grids.
        out_norms: Add a LayerNorm per output (default False, as the official PVT).
        drop_path_rate: Stochastic depth.
        with_cp: Gradient checkpointing.
        norm_eval: Keep BatchNorms in eval mode (none in the backbone; kept for the mm interface).
        pretrained: Deprecated, use init_cfg.
        init_cfg: mm init config; ``dict(type='Pretrained', checkpoint=...)``.
        **model_kwargs: Passed to ``timm.create_model`` (e.g. ``depths`` for reduced test models).
    """
    _filter_fn = staticmethod(agent_pvt.checkpoint_filter_fn)
    _default_model = 'agent_pvt_tiny'
    _pad_input = False
    _stem_path = 'stages.0.patch_embed'

    def _stem_params(self) -> List[nn.Parameter]:
        return [self.model.stages[0].pos_embed]


@MODELS.register_module()
class AgentSwinTransformer(_AgentBackbone):
    """Agent-Swin backbone (official ``AgentSwinTransformer``): 4 LayerNorm-ed stage maps at strides 4..32.

    Args: as :class:`AgentPVT` (``model_name`` 'agent_swin_tiny', '_small', '_base'); ``out_norms`` defaults to True
    (``norm{i}`` per output, as the official backbone). Window blocks shift on every odd block as the official
    downstream backbone.
    """
    _filter_fn = staticmethod(agent_swin.checkpoint_filter_fn)
    _default_model = 'agent_swin_tiny'
    _default_out_norms = True
    _stages_path = 'layers'

    def _model_defaults(self) -> Dict[str, Any]:
        # the official downstream Swin shifts every odd window block, also where the classification model (built
        # at 224) does not because its construction map is no larger than the window
        return dict(always_shift=True)


@MODELS.register_module()
class AgentCSwin(_AgentBackbone):
    """Agent-CSwin backbone: 4 LayerNorm-ed stage maps at strides 4..32 (no official dense version exists).

    Args: as :class:`AgentPVT` (``model_name`` 'agent_cswin_tiny', '_small', '_base'); agent stages are global over
    the whole map (``la_split_size=None``), ``out_norms`` defaults to True. Blocks per stage are ``depths`` as for the
    other backbones (the timm model keeps the official CSwin name ``depth``, also accepted here).
    """
    _filter_fn = staticmethod(agent_cswin.checkpoint_filter_fn)
    _default_model = 'agent_cswin_tiny'
    _default_out_norms = True

    def _model_defaults(self) -> Dict[str, Any]:
        return dict(la_split_size=None)

    def _model_kwargs(self, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        if 'depths' in kwargs:
            if 'depth' in kwargs:
                raise ValueError('AgentCSwin: pass depths (blocks per stage) or its model name depth, not both')
            kwargs = dict(kwargs)
            kwargs['depth'] = kwargs.pop('depths')
        return kwargs


@MODELS.register_module()
class TAPFAN(_TimmBackbone):
    """TAP-FAN hybrid backbone (official TAPADL ``segmentation`` FAN): 4 maps for a SegFormer head, and ADL maps.

    Outputs (official order; ``tap_fan_base_16_p4_hybrid``: channels 128, 256, 448, 448):

    - 0, 1: the two ConvNeXt stage maps of the hybrid stem (strides 4 and 8);
    - 2: the tokens after FAN block ``block_index`` as a map (stride 16);
    - 3: the patch tokens after the two class-attention blocks (with the class token prepended, no final norm), as
      a map at stride 16. The official config declares ``feature_strides=[4, 8, 16, 32]``, but this map has
      stride 16, as the official backbone returns it (the SegFormer head resizes every map to stride 4 anyway).

    Attention maps for ADL: inside ``with backbone.record_attention():`` the forward also keeps the post-softmax
    map (B, heads, N, N) of every FAN block (then computed explicitly instead of by fused SDPA), and
    :meth:`pop_attention` returns them; :class:`vitzoo.mm.ADLEncoderDecoder` adds them to the loss as ``loss_ad``.
    Outside it the forward is the plain feature extractor (the official backbone returns ``(feats, attn)`` in train
    mode and feats in eval mode).

    Any input size, square or not: the image is zero-padded bottom/right to a multiple of 16 and each map is cropped
    back to ``ceil(size / stride)``; TAP and the Fourier position encoding work on the actual (h, w) token grid (the
    official reshapes the tokens to ``int(N ** 0.5)`` squared, which breaks non-square inputs).

    Args:
        model_name: vitzoo hybrid FAN ('tap_fan_base_16_p4_hybrid' (default), '_tiny_8_', '_small_12_', '_large_16_',
            or the plain 'fan_*_p4_hybrid' models).
        img_size: Classification resolution (nothing is tied to it in FAN).
        out_indices: Maps to return, 0..3.
        block_index: FAN block whose output is map 2 (default the last; the official large hybrid uses 18).
        frozen_stages: -1 none; 0 freezes the ConvNeXt stem; k > 0 also the stages 0..k-1 of (ConvNeXt stage 0,
            ConvNeXt stage 1, patch projection + position encoding + FAN blocks, class token + class-attention
            blocks). Frozen parts stay in eval mode (their BatchNorms keep their statistics).
        drop_path_rate: Stochastic depth (the official segmentation backbone hard-codes 0).
        sync_dwconv_bn: Make the channel-processing DWConv BatchNorms ``SyncBatchNorm``, as the official segmentation
            FAN (multi-GPU training; mmengine's Runner reverts them to BatchNorm in a single process).
        with_cp: Gradient checkpointing.
        norm_eval: Keep every BatchNorm (TAP dilation predictor, DWConv) in eval mode while training.
        pretrained: Deprecated, use init_cfg.
        init_cfg: ``dict(type='Pretrained', checkpoint=...)``: an ImageNet (official ``{'state_dict': ...}`` or
            vitzoo) checkpoint mapped by ``vitzoo.models.fan.checkpoint_filter_fn``, the official segmentation
            checkpoint's backbone (``backbone.`` keys, no final norm), or a checkpoint of this wrapper.
        **model_kwargs: Passed to ``timm.create_model`` (e.g. ``depth``, ``backbone_depths`` for reduced models).
    """
    _filter_fn = staticmethod(fan_models.checkpoint_filter_fn)
    _default_model = 'tap_fan_base_16_p4_hybrid'

    def __init__(
            self,
            model_name: Optional[str] = None,
            img_size: Union[int, Tuple[int, int]] = 224,
            out_indices: Sequence[int] = (0, 1, 2, 3),
            block_index: Optional[int] = None,
            frozen_stages: int = -1,
            drop_path_rate: float = 0.0,
            sync_dwconv_bn: bool = False,
            with_cp: bool = False,
            norm_eval: bool = False,
            pretrained: Optional[str] = None,
            init_cfg: Optional[Union[dict, List[dict]]] = None,
            **model_kwargs,
    ):
        create_kwargs = {**model_kwargs, 'img_size': img_size, 'drop_path_rate': drop_path_rate}
        super().__init__(model_name, create_kwargs, out_indices, frozen_stages, norm_eval, pretrained, init_cfg)
        m = self.model
        if not isinstance(m.patch_embed, fan_models.HybridEmbed) or len(m.patch_embed.backbone.stages) != 2:
            raise ValueError(f'TAPFAN wraps the hybrid FAN models (2-stage ConvNeXt stem, *_p4_hybrid); '
                             f'{self.model_name} is not one')
        depth = len(m.blocks)
        self.block_index = depth - 1 if block_index is None else int(block_index)
        if not 0 <= self.block_index < depth:
            raise ValueError(f'TAPFAN: block_index must be in 0..{depth - 1}, got {block_index}')
        self._patch = m.patch_size
        # unused by the dense outputs: the final norm and the classifier, and the class-attention part if map 3 is
        # not asked for (no unused parameters under DDP)
        m.norm = nn.Identity()
        m.reset_classifier(0)
        if 3 not in out_indices:
            m.cls_attn_blocks = nn.ModuleList()
            del m.cls_token
            m.register_parameter('cls_token', None)
        if with_cp:
            m.set_grad_checkpointing(True)
        if sync_dwconv_bn:
            for blk in m.blocks:
                dw = getattr(getattr(blk.mlp, 'mlp_v', None), 'dwconv', None)
                if dw is not None:
                    dw.bn = nn.SyncBatchNorm(dw.bn.num_features, eps=dw.bn.eps, momentum=dw.bn.momentum)
        stem = m.patch_embed.backbone
        channels = [stem.stem[0].out_channels, stem.num_features, m.feature_info[self.block_index]['num_chs'],
                    m.num_features]
        self.num_features = [channels[i] for i in self.out_indices]
        self._freeze_stages()

    def _stage_modules(self) -> List[List[nn.Module]]:
        m = self.model
        stem = m.patch_embed.backbone
        trunk = [m.patch_embed.proj, m.blocks] + ([m.pos_embed] if m.pos_embed is not None else [])
        return [[stem.stages[0]], [stem.stages[1]], trunk, [m.cls_attn_blocks]]

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        modules = [self.model.patch_embed.backbone.stem]
        for group in self._stage_modules()[:self.frozen_stages]:
            modules += group
        params = [p for mod in modules for p in mod.parameters()]
        if self.frozen_stages >= 4 and self.model.cls_token is not None:
            params.append(self.model.cls_token)
        for mod in modules:
            mod.eval()
        for p in params:
            p.requires_grad = False

    def record_attention(self) -> ContextManager[None]:
        """While active, each forward keeps every FAN block's attention map for :meth:`pop_attention`."""
        return self.model.record_attention()

    def pop_attention(self) -> List[torch.Tensor]:
        """The attention maps (one (B, heads, N, N) per FAN block) of the last recorded forward; clears them."""
        return self.model.pop_attention()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Maps (B, C_i, H_i, W_i) for ``out_indices``."""
        H, W = x.shape[-2:]
        x = self._prepare_input(x)
        Hp, Wp = x.shape[-2:]
        # ADL needs every block's attention map, map 3 every block's output
        every_block = self.model.recording_attention or 3 in self.out_indices
        maps = self.model.forward_intermediates(
            x, indices=[self.block_index], stop_early=not every_block, intermediates_only=True, stem=True,
            cls_attn=3 in self.out_indices)
        outs = []
        for i in self.out_indices:
            f = maps[i]
            if (Hp, Wp) != (H, W):  # crop the maps of the zero padding
                fh, fw = f.shape[-2:]
                f = f[..., :-(-H * fh // Hp), :-(-W * fw // Wp)]
            outs.append(f.contiguous())
        return tuple(outs)
