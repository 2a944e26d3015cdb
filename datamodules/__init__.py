"""LightningDataModules over kvprobe captures."""

from datamodules.kv_capture import CaptureDataset, KVCaptureDataModule, SplitSpec

__all__ = ["CaptureDataset", "KVCaptureDataModule", "SplitSpec"]
