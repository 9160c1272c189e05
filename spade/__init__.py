"""SPADE / GauGAN semantic image synthesis (Park et al., CVPR 2019)."""

__version__ = "0.1.0"
