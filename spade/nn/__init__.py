"""The networks: SPADE normalisation and blocks, generator, discriminator, encoder, VGG features."""

from spade.nn.discriminator import MultiscaleDiscriminator, NLayerDiscriminator
from spade.nn.encoder import ConvEncoder, reparameterize
from spade.nn.generator import SPADEGenerator
from spade.nn.resblock import SPADEResBlock
from spade.nn.spade_norm import SPADE
from spade.nn.spectral import SpectralNormConv2d

__all__ = [
    "SPADE",
    "ConvEncoder",
    "MultiscaleDiscriminator",
    "NLayerDiscriminator",
    "SPADEGenerator",
    "SPADEResBlock",
    "SpectralNormConv2d",
    "reparameterize",
]
