"""Test-wide setup: where the shared offline datasets are.

Tests that need real data read the ``FEDHET_DATA`` environment variable; when it is not set and a
``shared/data`` folder stands beside the repository (as on CI), that folder is used. Tests skip
with a reason when neither exists.
"""

from __future__ import annotations

import os
from pathlib import Path

_sibling = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "FEDHET_DATA" not in os.environ and _sibling.is_dir():
    os.environ["FEDHET_DATA"] = str(_sibling)
