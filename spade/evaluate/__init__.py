"""Evaluation: FID, segmentation metrics (mIoU, pixel accuracy) and the segmenters they rely on."""
