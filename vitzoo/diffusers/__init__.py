"""AgentSD for diffusers: agent attention + token merging for Stable Diffusion 1.x / 2.x / SDXL pipelines.

Usage::

    from vitzoo.diffusers import apply_patch, remove_patch, AgentSDSchedule
    apply_patch(pipe)                                          # steps 0-19 settings of the paper's schedule
    image = pipe(prompt, callback_on_step_end=AgentSDSchedule()).images[0]   # the full recommended schedule
    remove_patch(pipe)                                         # bit-identical to never patched

This subpackage needs diffusers (``pip install vitzoo[sd]``); ``import vitzoo`` does not import it.
"""
try:
    import diffusers as _diffusers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised by the tests with diffusers hidden
    raise ImportError(
        'vitzoo.diffusers (AgentSD) needs the diffusers package, which is not installed: '
        'pip install vitzoo[sd]  (or: pip install diffusers transformers)') from e

from .agentsd import (
    RECOMMENDED_EARLY,
    RECOMMENDED_LATE,
    AgentSDAttnProcessor,
    AgentSDSchedule,
    agentsd_attention,
    agentsd_self_attention,
    apply_patch,
    is_patched,
    patch_info,
    remove_patch,
    update_patch,
)

__all__ = [
    'apply_patch', 'remove_patch', 'update_patch', 'is_patched', 'patch_info', 'AgentSDSchedule',
    'AgentSDAttnProcessor', 'agentsd_attention', 'agentsd_self_attention', 'RECOMMENDED_EARLY', 'RECOMMENDED_LATE',
]
