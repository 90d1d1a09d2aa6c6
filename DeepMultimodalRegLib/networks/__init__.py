"""Networks: the DISA descriptor CNN and its 8-bit descriptors."""

from .disa_net import (DESCRIPTOR_CHANNELS, EXPECTED_PARAMETERS, LEAKY_SLOPE, MIN_AXIS_SIZE, OUTPUT_STRIDE,
                       RECEPTIVE_FIELD, SLAB_HALO, BlurPool3d, DISANet, ResidualBlock, compute_descriptors,
                       count_parameters, descriptor_geometry, descriptor_shape, load_disa_network,
                       pad_to_receptive_field)
from .quantize import dequantize, int8_dot, quantize

__all__ = ["DISANet", "ResidualBlock", "BlurPool3d", "count_parameters", "compute_descriptors",
           "descriptor_geometry", "descriptor_shape", "pad_to_receptive_field", "load_disa_network",
           "quantize", "dequantize", "int8_dot", "DESCRIPTOR_CHANNELS", "EXPECTED_PARAMETERS", "LEAKY_SLOPE",
           "MIN_AXIS_SIZE", "OUTPUT_STRIDE", "RECEPTIVE_FIELD", "SLAB_HALO"]
