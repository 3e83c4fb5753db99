"""Distributed training with frozen parts: DDP that follows freezing, FSDP2 and DCP helpers.

Verbs of every layer see through DDP, FSDP2 and ``torch.compile`` wrappers
(``torchfreeze._core.wrappers``). This layer adds what needs a process group:
:func:`wrap` (a DDP handle that re-wraps after each change of
``requires_grad``), :func:`release`, and :func:`save_distributed` /
:func:`load_distributed` (a DCP checkpoint that resumes a run that unfroze
layers exactly). See docs/distributed.md.
"""

from torchfreeze.distributed.dcp import load_distributed, save_distributed
from torchfreeze.distributed.ddp import DDPHandle, release, wrap

__all__ = ["wrap", "release", "DDPHandle", "save_distributed", "load_distributed"]
