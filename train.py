"""Train an MRF regressor: ``python train.py model=gru`` (see mrflight/configs/train.yaml).

The same command as ``mrflight-train`` of an installed mrflight (:func:`mrflight.cli.train`).
Bad input (config values, unknown options, missing files) exits with status 2 and one line
``error: ...`` on stderr (``MRFLIGHT_DEBUG=1`` shows the traceback); a multirun in which some
jobs failed exits with status 3 after all jobs ran (``failures.json`` in the sweep dir).
"""

from mrflight.cli import train

if __name__ == "__main__":
    train()
