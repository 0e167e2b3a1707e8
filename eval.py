"""Evaluate trained models against dictionary matching: ``python eval.py`` "
"(mrflight/configs/eval.yaml).

Bad input (config values, unknown options, missing files) exits with status 2 and one line
``error: ...`` on stderr (``MRFLIGHT_DEBUG=1`` shows the traceback).
"""

import hydra
from omegaconf import DictConfig

from mrflight.errors import guard, run_cli


@hydra.main(version_base="1.3", config_path="mrflight/configs", config_name="eval")
@guard
def main(cfg: DictConfig):
    from mrflight.pipeline import evaluate

    return evaluate(cfg)


if __name__ == "__main__":
    run_cli(main, config_name="eval")
