"""Datasets and the LightningDataModule for training the regressors."""

from mrflight.transforms import preprocess

from .batches import Batch
from .simulated import ParameterPrior, SimulatedDataModule
from .stored import FingerprintDataModule, FingerprintDataset

__all__ = ["Batch", "FingerprintDataModule", "FingerprintDataset", "preprocess",
           "ParameterPrior", "SimulatedDataModule"]
