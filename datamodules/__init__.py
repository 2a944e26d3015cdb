"""LightningDataModules over kvprobe captures."""

from datamodules.difficulty import DifficultyDataModule
from datamodules.kv_capture import CaptureDataset, KVCaptureDataModule, SplitSpec
from datamodules.switch import SwitchDataModule

__all__ = ["CaptureDataset", "DifficultyDataModule", "KVCaptureDataModule", "SplitSpec", "SwitchDataModule"]
