"""Evaluate trained models against dictionary matching: ``python eval.py``
(mrflight/configs/eval.yaml).

The same command as ``mrflight-eval`` of an installed mrflight (:func:`mrflight.cli.evaluate`).
Bad input (config values, unknown options, missing files) exits with status 2 and one line
``error: ...`` on stderr (``MRFLIGHT_DEBUG=1`` shows the traceback).
"""

from mrflight.cli import evaluate

if __name__ == "__main__":
    evaluate()
