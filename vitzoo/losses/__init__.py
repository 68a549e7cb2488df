"""Training losses of the vitzoo methods (each method's losses in its own module, re-exported here).

- :mod:`vitzoo.losses.sparsifiner`: predictor distillation (phase 1) and backbone distillation (phase 2).
- :mod:`vitzoo.losses.sat`: SAT's batch area loss and normalization loss.
- :mod:`vitzoo.losses.adl`: the attention diversification loss of TAP + ADL.
"""
from . import adl, sat, sparsifiner  # noqa: F401
from .adl import AttentionDiversificationLoss, attention_diversification_loss  # noqa: F401
from .sat import SATLoss, sat_area_loss, sat_area_ratio, sat_norm_loss, sat_norm_term  # noqa: F401
from .sparsifiner import SparsifinerLoss, attn_recon_loss, teacher_outputs  # noqa: F401
