"""``python -m torchfreeze.cli.bench ARGS``: the same as ``torchfreeze bench ARGS``."""

import sys

from torchfreeze.cli.bench import main

sys.exit(main(sys.argv[1:]))
