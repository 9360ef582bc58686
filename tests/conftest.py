"""Test-wide setup: where the shared offline datasets are.

Tests that need real data read the ``FEDHET_DATA`` environment variable; when it is not set and a
``shared/data`` folder stands beside the repository (as on CI), that folder is used. Tests skip
with a reason when neither exists.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

_sibling = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "FEDHET_DATA" not in os.environ and _sibling.is_dir():
    os.environ["FEDHET_DATA"] = str(_sibling)


@pytest.fixture(scope="module")
def one_thread():
    """Pin torch to one intra-op thread for a module: tiny models only lose to thread contention, and
    a fixed count keeps bit-for-bit comparisons like for like."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def keep_threads():
    """Restore torch's intra-op thread count after a test that runs the CLI (a run sets it from
    ``runtime.threads``)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run_interrupted(run, at: int):
    """Run ``run`` and stop it after round ``at`` as a crash would (its checkpoint stays behind)."""
    from fedhet.simulation.loop import run_rounds

    def stop(rnd, row):
        if rnd == at:
            raise KeyboardInterrupt

    run.on_round = stop
    with pytest.raises(KeyboardInterrupt):
        run_rounds(run)
