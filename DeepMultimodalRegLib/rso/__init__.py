"""RSO: deep deformable registration refined interactively (Bai et al. 2023).

A general VoxelMorph-type model (MONAI U-Net) predicts the displacement; image-specific
optimisation (ISO) fine-tunes it on one pair; region-specific optimisation (RSO) fine-tunes it for
a box the user draws.  :class:`DeepRegistrationSession` keeps the state between these steps.

Modules: ``model`` (the network), ``weights`` (loading), ``prepare`` (intensities),
``working_grid`` (resampling, padding, field back to the fixed grid, spatial transformer),
``losses``, ``session``, ``runner`` (the registry entry ``deep``), ``train_general`` (the recipe).
"""

from .session import DeepRegistrationSession
from . import runner as _runner  # noqa: F401  (registers the "deep" method)

__all__ = ["DeepRegistrationSession"]
