"""Train an MRF regressor: ``python train.py model=gru`` (see configs/train.yaml)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from mrflight.pipeline import train

    return train(cfg)


if __name__ == "__main__":
    main()
