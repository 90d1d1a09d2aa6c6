"""Similarity metrics: LC² (patch, dense map, volume, DISA target) and MIND-SSC."""

from .lc2 import (DISA_RADII, LC2_RIDGE, LC2_VARIANCE_FLOOR, disa_target, lc2_at_points, lc2_map, patch_lc2,
                  volume_lc2)
from .local_stats import box_mean, extract_patches, gradient_magnitude
from .mind import MIND_SSC_PAIRS, MIND_VARIANCE_CLAMP, mind_ssc, mind_ssd

__all__ = ["patch_lc2", "lc2_at_points", "disa_target", "lc2_map", "volume_lc2", "mind_ssc", "mind_ssd",
           "gradient_magnitude", "box_mean", "extract_patches", "LC2_RIDGE", "LC2_VARIANCE_FLOOR",
           "DISA_RADII", "MIND_SSC_PAIRS", "MIND_VARIANCE_CLAMP"]
