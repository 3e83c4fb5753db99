"""torchfreeze.hub.models: the built-ins' builders and the digits data helpers at one import path."""

from __future__ import annotations

import subprocess
import sys


def test_the_import_path_of_scripts_and_the_demo_registers_and_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from torchfreeze.hub.models import DigitsBackbone, load_digits_tensors, stratified_split, minilm_classifier\n"
        "from torchfreeze.hub import registry\n"
        "print(sorted(registry._REGISTRY), *[m for m in sys.modules if m.startswith(('sklearn', 'transformers'))])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.split() == ["[]"]
