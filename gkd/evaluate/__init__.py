"""mIoU metric, whole-image and sliding-window inference, cross-domain evaluation."""
