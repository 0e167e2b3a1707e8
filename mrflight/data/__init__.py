"""Datasets and the LightningDataModule for training the regressors."""

from .datamodule import Batch, FingerprintDataModule, FingerprintDataset, preprocess

__all__ = ["Batch", "FingerprintDataModule", "FingerprintDataset", "preprocess"]
