"""Transforms (fixed → moving, LPS mm), resampling, ITK file I/O and Jacobians."""

from .base import Transform
from .bspline import BSplineTransform, control_grid_for_domain
from .composite import CompositeTransform
from .displacement import DisplacementFieldTransform
from .itk_io import from_sitk, read_transform, to_sitk, write_transform
from .jacobian import folding_fraction, jacobian_determinant
from .linear import AffineTransform, LinearTransform, RigidTransform, euler_zxy_matrix
from .resample import resample, resample_tensor, warp_volume

__all__ = ["Transform", "LinearTransform", "RigidTransform", "AffineTransform", "BSplineTransform",
           "DisplacementFieldTransform", "CompositeTransform", "control_grid_for_domain", "euler_zxy_matrix",
           "resample", "resample_tensor", "warp_volume", "read_transform", "write_transform", "to_sitk",
           "from_sitk", "jacobian_determinant", "folding_fraction"]
