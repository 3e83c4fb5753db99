"""The ``torchfreeze`` command: demo, inspect, bench. Nothing else in the package imports it."""
