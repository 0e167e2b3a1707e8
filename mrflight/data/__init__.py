"""Datasets and the LightningDataModule for training the regressors."""

from mrflight.transforms import preprocess

from .datamodule import Batch, FingerprintDataModule, FingerprintDataset
from .simulated import ParameterPrior, SimulatedDataModule

__all__ = ["Batch", "FingerprintDataModule", "FingerprintDataset", "preprocess",
           "ParameterPrior", "SimulatedDataModule"]
