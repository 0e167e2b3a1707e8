"""Evaluate trained models against dictionary matching: ``python eval.py`` (configs/eval.yaml)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig):
    from mrflight.pipeline import evaluate

    return evaluate(cfg)


if __name__ == "__main__":
    main()
