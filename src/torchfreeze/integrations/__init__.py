"""Trainer integrations: a Lightning callback and a Hugging Face ``TrainerCallback``.

Each integration lives in its own module and imports its trainer only when that module is
imported: ``import torchfreeze.integrations`` imports neither Lightning nor transformers.

- :mod:`torchfreeze.integrations.lightning` (extra ``lightning``): ``FreezeCallback``.
- :mod:`torchfreeze.integrations.transformers` (extra ``trainer``): ``FreezeCallback`` and
  ``FreezeTrainer``.

Both share one implementation of the plan, the schedule, the checks and the guard
(:class:`torchfreeze.integrations.plan.FreezeRun`); see ``docs/lightning.md`` and
``docs/transformers.md``.
"""

from torchfreeze.integrations.plan import FreezeRun, Interval, OnMissing

__all__ = ["FreezeRun", "Interval", "OnMissing"]
