"""vitzoo models: importing this package registers every model family with timm."""
from .agent_deit import *  # noqa: F401,F403
from ._helpers import CheckpointError  # noqa: F401
