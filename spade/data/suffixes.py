"""The image file suffixes spade reads (photos and label maps): one torch-free list for every module."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
