"""The command lines: ``mrflight-train`` and ``mrflight-eval`` (console scripts of an installed
mrflight) are ``python train.py`` and ``python eval.py`` of a checkout, which call them.

Both read the YAML files under ``mrflight/configs`` shipped in the package, so a wheel
installed without the repository trains and evaluates with the same options. Bad input exits
with status 2 and one line ``error: ...`` on stderr (see :func:`mrflight.errors.run_cli`).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from mrflight.errors import guard, run_cli

__all__ = ["train", "evaluate"]

#: the shipped configs, as a folder: ``mrflight/configs`` is data, not a package, so Hydra's
#: ``pkg://`` search path (a module-relative ``config_path``) cannot name it
CONFIGS = str(Path(__file__).resolve().parent / "configs")


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="train")
@guard
def _train(cfg: DictConfig) -> float | None:
    from mrflight.pipeline import train as run

    return run(cfg)


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="eval")
@guard
def _evaluate(cfg: DictConfig):
    from mrflight.pipeline import evaluate as run

    return run(cfg)


def train() -> None:
    """``mrflight-train [overrides]``: train an MRF regressor (``python train.py``)."""
    run_cli(_train, config_name="train")


def evaluate() -> None:
    """``mrflight-eval [overrides]``: evaluate, map or export (``python eval.py``)."""
    run_cli(_evaluate, config_name="eval")
