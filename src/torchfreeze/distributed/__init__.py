"""Distributed training with frozen parts: DDP that follows freezing, FSDP2 and DCP helpers.

Verbs of every layer see through DDP, FSDP2 and ``torch.compile`` wrappers
(``torchfreeze._core.wrappers``). This layer adds what needs a process group:
:func:`wrap` (a DDP handle that re-wraps after each change of
``requires_grad``) and :func:`release`. See docs/distributed.md.
"""

from torchfreeze.distributed.ddp import DDPHandle, release, wrap

__all__ = ["wrap", "release", "DDPHandle"]
