"""Datasets and the LightningDataModule for training the regressors."""

from .datamodule import Batch, FingerprintDataModule, FingerprintDataset, preprocess
from .simulated import ParameterPrior, SimulatedDataModule

__all__ = ["Batch", "FingerprintDataModule", "FingerprintDataset", "preprocess",
           "ParameterPrior", "SimulatedDataModule"]
