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


@pytest.fixture
def wandb_record():
    """``read(path, done)``: :func:`mrflight.loggers.read_offline_run` of ``path`` once
    ``done(record)`` holds, or after 30 s (W&B's service may still be writing the run's file
    when ``finish()`` returns, the more so on a loaded machine)."""
    import time

    from mrflight.loggers import read_offline_run

    def read(path, done, timeout_s=30.0):
        t0 = time.monotonic()
        while True:
            r = read_offline_run(path)
            if done(r) or time.monotonic() - t0 > timeout_s:
                return r
            time.sleep(0.5)

    return read
