"""DISA-LC²: descriptors whose dot product approximates LC² (Ronchetti et al., MICCAI 2023).

This package holds what uses the trained descriptor network: preprocessing to the network's
working spacing, and the similarity-map tool.  The registration engine (rigid, affine, deformable,
local and global search) registers its methods here when it lands.
"""

from .preprocess import DISA_SPACING_MM, prepare_for_disa
from .similarity_map import SimilarityMaps, map_agreement, similarity_maps, write_similarity_map_png

__all__ = ["DISA_SPACING_MM", "prepare_for_disa", "SimilarityMaps", "similarity_maps", "map_agreement",
           "write_similarity_map_png"]
