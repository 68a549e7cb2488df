"""vitzoo: a timm-native zoo of recent vision-transformer attention methods.

Importing the package registers every vitzoo model with timm, so ``timm.create_model('agent_deit_small')`` works.
"""
from .version import __version__
from . import models  # noqa: F401  (registers the models in timm)

__all__ = ['__version__', 'models']
