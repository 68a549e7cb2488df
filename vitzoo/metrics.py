"""Robustness metrics: ImageNet-C corruption error (CE), mCE and relative mCE (Hendrycks & Dietterich, ICLR 2019).

All errors are fractions in ``[0, 1]``; the summary reports mCE / relative mCE ``x 100`` as papers do ("mCE 43.7").

- ``CE_c = mean_s E[s, c] / E_AlexNet[c]``
- ``relative CE_c = (mean_s E[s, c] - E_clean) / (E_AlexNet[c] - E_AlexNet_clean)``
- ``mCE`` / ``relative mCE`` = means over the 15 standard corruptions only; the 4 extra corruptions get a CE but are
  reported separately.

The AlexNet constants are **keyed by corruption name**: forks that reorder the corruption list but keep a positional
constant list pair the wrong constants, so nothing here depends on list order.

Example::

    from vitzoo.metrics import imagenet_c_summary
    errors = {'gaussian_noise': {1: 0.3, 2: 0.4, 3: 0.5, 4: 0.6, 5: 0.7}, ...}   # top-1 error per (c, s)
    s = imagenet_c_summary(errors, clean_error=0.2)                              # s['mce'], s['relative_mce'], ...
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional

__all__ = [
    'CORRUPTIONS', 'EXTRA_CORRUPTIONS', 'ALL_CORRUPTIONS', 'CORRUPTION_GROUPS', 'SEVERITIES', 'ALEXNET_ERR',
    'ALEXNET_CLEAN_ERR', 'corruption_error', 'relative_corruption_error', 'imagenet_c_summary',
]

# The 15 mCE corruptions in the canonical order (imagecorruptions subset 'common', numbers 0-14).
CORRUPTIONS: tuple[str, ...] = (
    'gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'glass_blur', 'motion_blur', 'zoom_blur', 'snow',
    'frost', 'fog', 'brightness', 'contrast', 'elastic_transform', 'pixelate', 'jpeg_compression',
)
# The 4 extra "validation" corruptions (numbers 15-18): not part of mCE.
EXTRA_CORRUPTIONS: tuple[str, ...] = ('speckle_noise', 'gaussian_blur', 'spatter', 'saturate')
ALL_CORRUPTIONS: tuple[str, ...] = CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
CORRUPTION_GROUPS: Dict[str, str] = {
    **{c: 'noise' for c in ('gaussian_noise', 'shot_noise', 'impulse_noise', 'speckle_noise')},
    **{c: 'blur' for c in ('defocus_blur', 'glass_blur', 'motion_blur', 'zoom_blur', 'gaussian_blur')},
    **{c: 'weather' for c in ('snow', 'frost', 'fog', 'brightness', 'spatter')},
    **{c: 'digital' for c in ('contrast', 'elastic_transform', 'pixelate', 'jpeg_compression', 'saturate')},
}

# AlexNet top-1 error averaged over the 5 severities (hendrycks/robustness, augmix, TAPADL evaluators agree).
ALEXNET_ERR: Dict[str, float] = {
    'gaussian_noise': 0.886428,
    'shot_noise': 0.894468,
    'impulse_noise': 0.922640,
    'defocus_blur': 0.819880,
    'glass_blur': 0.826268,
    'motion_blur': 0.785948,
    'zoom_blur': 0.798360,
    'snow': 0.866816,
    'frost': 0.826572,
    'fog': 0.819324,
    'brightness': 0.564592,
    'contrast': 0.853204,
    'elastic_transform': 0.646056,
    'pixelate': 0.717840,
    'jpeg_compression': 0.606500,
}
# AlexNet clean top-1 error, only needed for relative mCE. The paper's table gives 43.5 %; none of the referenced
# evaluators ships the constant (third-party code uses 0.4345), so it is a parameter everywhere it is used.
ALEXNET_CLEAN_ERR: float = 0.435


def _mean_error(errors_by_severity: Mapping[int, float], corruption: str, severities: Iterable[int]) -> float:
    missing = [s for s in severities if s not in errors_by_severity]
    if missing:
        raise ValueError(f'{corruption}: no error for severities {missing} (CE needs all of {list(severities)})')
    vals = [float(errors_by_severity[s]) for s in severities]
    for v in vals:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f'{corruption}: error {v} is not a fraction in [0, 1]')
    return sum(vals) / len(vals)


def corruption_error(errors_by_severity: Mapping[int, float], corruption: str,
                     severities: Iterable[int] = SEVERITIES) -> float:
    """CE of one corruption: mean top-1 error over the severities / AlexNet's (a fraction; 1.0 = AlexNet).

    Args:
        errors_by_severity: ``{severity: top-1 error}``.
        corruption: Corruption name (one of :data:`CORRUPTIONS`; keys the AlexNet constant).
        severities: Severities averaged (all 5 for the standard CE).
    """
    if corruption not in ALEXNET_ERR:
        raise KeyError(f'no AlexNet error for corruption {corruption!r} (known: {", ".join(CORRUPTIONS)})')
    return _mean_error(errors_by_severity, corruption, tuple(severities)) / ALEXNET_ERR[corruption]


def relative_corruption_error(errors_by_severity: Mapping[int, float], corruption: str, clean_error: float,
                              alexnet_clean_error: float = ALEXNET_CLEAN_ERR,
                              severities: Iterable[int] = SEVERITIES) -> float:
    """Relative CE: (mean_s error - clean error) / (AlexNet mean_s error - AlexNet clean error)."""
    if corruption not in ALEXNET_ERR:
        raise KeyError(f'no AlexNet error for corruption {corruption!r} (known: {", ".join(CORRUPTIONS)})')
    mean = _mean_error(errors_by_severity, corruption, tuple(severities))
    return (mean - float(clean_error)) / (ALEXNET_ERR[corruption] - float(alexnet_clean_error))


def imagenet_c_summary(
        errors: Mapping[str, Mapping[int, float]],
        clean_error: Optional[float] = None,
        alexnet_clean_error: float = ALEXNET_CLEAN_ERR,
        severities: Iterable[int] = SEVERITIES,
) -> Dict[str, object]:
    """Summarise a ``{corruption: {severity: top-1 error}}`` table.

    Returns a dict with (percent values, ``x 100``):
        ``ce`` / ``relative_ce``: per standard corruption present with all severities;
        ``mce`` / ``relative_mce``: means over the 15 standard corruptions (None unless all 15 are complete; relative
        needs ``clean_error``); ``mce_partial``: mean CE over the standard corruptions present (always, if any);
        ``mean_error`` / ``mean_accuracy`` per corruption (incl. extra ones) and ``mean_corruption_accuracy`` over all
        (corruption, severity) cells present; ``mean_corruption_accuracy_15`` over the standard 15 only;
        ``complete``: whether mCE is defined; ``missing``: standard corruptions lacking or incomplete.

    Args:
        errors: Top-1 error fractions; order of corruptions is irrelevant.
        clean_error: The model's clean top-1 error (fraction), for relative mCE.
        alexnet_clean_error: AlexNet's clean error (default :data:`ALEXNET_CLEAN_ERR`).
        severities: Severities that make a corruption complete.
    """
    severities = tuple(severities)
    unknown = sorted(set(errors) - set(ALL_CORRUPTIONS))
    if unknown:
        raise KeyError(f'unknown corruptions {unknown} (known: {", ".join(ALL_CORRUPTIONS)})')
    ce, rce, mean_err = {}, {}, {}
    missing = []
    for c in ALL_CORRUPTIONS:
        by_s = {int(s): float(e) for s, e in errors.get(c, {}).items()}
        if by_s:
            mean_err[c] = sum(by_s.values()) / len(by_s)
        if c not in ALEXNET_ERR:
            continue
        if not all(s in by_s for s in severities):
            missing.append(c)
            continue
        ce[c] = 100.0 * corruption_error(by_s, c, severities)
        if clean_error is not None:
            rce[c] = 100.0 * relative_corruption_error(by_s, c, clean_error, alexnet_clean_error, severities)
    complete = not missing
    cells = [float(e) for c in errors for e in errors[c].values()]
    cells15 = [float(e) for c in errors if c in ALEXNET_ERR for e in errors[c].values()]
    return {
        'ce': ce,
        'relative_ce': rce if clean_error is not None else None,
        'mce': sum(ce.values()) / len(ce) if complete else None,
        'relative_mce': sum(rce.values()) / len(rce) if complete and clean_error is not None else None,
        'mce_partial': sum(ce.values()) / len(ce) if ce else None,
        'mean_error': {c: 100.0 * v for c, v in mean_err.items()},
        'mean_accuracy': {c: 100.0 * (1.0 - v) for c, v in mean_err.items()},
        'mean_corruption_accuracy': 100.0 * (1.0 - sum(cells) / len(cells)) if cells else None,
        'mean_corruption_accuracy_15': 100.0 * (1.0 - sum(cells15) / len(cells15)) if cells15 else None,
        'clean_error': 100.0 * clean_error if clean_error is not None else None,
        'alexnet_clean_error': 100.0 * alexnet_clean_error,
        'complete': complete,
        'missing': missing,
    }
