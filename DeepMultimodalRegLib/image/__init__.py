"""Images and their geometry."""

from .geometry import ImageGeometry
from .io import read_image_sitk, read_volume, write_volume
from .normalize import ct_window, percentile_scale, zscore
from .validation import require_3d, require_finite, require_not_constant, validate_registration_input
from .volume import Volume

__all__ = ["ImageGeometry", "Volume", "read_volume", "write_volume", "read_image_sitk", "ct_window",
           "percentile_scale", "zscore", "require_3d", "require_finite", "require_not_constant",
           "validate_registration_input"]
