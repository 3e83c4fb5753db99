"""Training: optimizer groups, schedules, ``guard``/``check``, freeze state and trainable-only checkpoints."""

from torchfreeze.training.check import CODES, Problem, check
from torchfreeze.training.checkpoint import load_trainable, save_trainable
from torchfreeze.training.guard import Guard, guard
from torchfreeze.training.optim import add_unfrozen, drop_frozen, param_groups
from torchfreeze.training.progressive import ProgressiveFreezing
from torchfreeze.training.schedule import GradualUnfreezing
from torchfreeze.training.state import freeze_state, load_freeze_state

__all__ = [
    "param_groups",
    "add_unfrozen",
    "drop_frozen",
    "GradualUnfreezing",
    "ProgressiveFreezing",
    "guard",
    "Guard",
    "check",
    "Problem",
    "CODES",
    "freeze_state",
    "load_freeze_state",
    "save_trainable",
    "load_trainable",
]
