"""mrflight: Magnetic Resonance Fingerprinting reconstruction with neural networks.

Physics (EPG simulation, noise, Cramér–Rao bound) lives in :mod:`mrflight.physics`, dictionaries
in :mod:`mrflight.dictionary`, dictionary matching in :mod:`mrflight.matching`, the trainable
regressors in :mod:`mrflight.models`, and the Lightning/Hydra glue in :mod:`mrflight.regressor`,
:mod:`mrflight.data` and :mod:`mrflight.pipeline`.
"""

__version__ = "0.1.0"


def load_checkpoint(path, map_location="cpu"):
    """Load a trained regressor from a checkpoint file with no other argument.

    Returns the LightningModule in eval mode; use ``.predict_parameters(signals)``.
    """
    from mrflight.regressor import load_checkpoint as _load

    return _load(path, map_location=map_location)


__all__ = ["__version__", "load_checkpoint"]
