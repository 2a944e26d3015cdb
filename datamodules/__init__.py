"""LightningDataModules over kvprobe captures."""

from datamodules.difficulty import DifficultyDataModule
from datamodules.kv_capture import CaptureDataset, KVCaptureDataModule, SplitSpec

__all__ = ["CaptureDataset", "DifficultyDataModule", "KVCaptureDataModule", "SplitSpec"]
