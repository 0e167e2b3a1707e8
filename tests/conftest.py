import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture
def shared_data():
    """Path of ../shared/data (reference schedules and phantom values), skipping if absent."""
    if not os.path.isdir(SHARED):
        pytest.skip("../shared/data is not present beside the checkout")
    return os.path.abspath(SHARED)
