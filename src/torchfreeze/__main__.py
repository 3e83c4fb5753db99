"""``python -m torchfreeze`` is the ``torchfreeze`` command."""

from torchfreeze.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
