"""The integration tests import their shared modules (``_lit_models``, ``_hf_models``) from this folder."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
