"""The core: torch only. Selection, parameter uses, ``requires_grad``, pins, the nondeterminism predicate, fingerprints, trees, files.

Nothing here imports another torchfreeze layer; every other layer builds on it.
"""
