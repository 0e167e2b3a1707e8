"""Train an MRF regressor: ``python train.py model=gru`` (see mrflight/configs/train.yaml).

Bad input (config values, unknown options, missing files) exits with status 2 and one line
``error: ...`` on stderr (``MRFLIGHT_DEBUG=1`` shows the traceback); a multirun in which some
jobs failed exits with status 3 after all jobs ran (``failures.json`` in the sweep dir).
"""

import hydra
from omegaconf import DictConfig

from mrflight.errors import guard, run_cli


@hydra.main(version_base="1.3", config_path="mrflight/configs", config_name="train")
@guard
def main(cfg: DictConfig) -> float | None:
    from mrflight.pipeline import train

    return train(cfg)


if __name__ == "__main__":
    run_cli(main, config_name="train")
