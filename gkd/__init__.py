"""gkd-compress: generalizable knowledge distillation from vision foundation models for segmentation."""

__version__ = "0.1.0"
