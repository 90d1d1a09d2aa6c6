"""DISA-LC²: descriptors whose dot product approximates LC² (Ronchetti et al., MICCAI 2023), and the
registration engine that uses them.

Importing this package makes the feature-based methods available in the catalogue:
``disa-rigid|affine|deformable`` and ``mind-rigid|affine|deformable`` (the same engine on MIND-SSC
descriptors), and ``lc2-rigid`` (direct volume LC², derivative-free).
"""

from functools import partial

from ..methods.registry import register_method
from .preprocess import DISA_SPACING_MM, prepare_for_disa
from .lc2_direct import register_lc2_rigid
from .register import register_with_features
from .similarity_map import SimilarityMaps, map_agreement, similarity_maps, write_similarity_map_png

for _kind in ("disa", "mind"):
    for _mode in ("rigid", "affine", "deformable"):
        register_method(f"{_kind}-{_mode}", partial(register_with_features, _kind, _mode))
register_method("lc2-rigid", register_lc2_rigid)

__all__ = ["DISA_SPACING_MM", "prepare_for_disa", "SimilarityMaps", "similarity_maps", "map_agreement",
           "write_similarity_map_png", "register_with_features"]
