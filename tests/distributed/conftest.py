"""The distributed tests: helpers from this folder (the gloo world of one is in tests/conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
