"""SOPI 2D/3D registration of a CT to an X-ray (Chen et al. 2023).

The C-arm geometry and pose convention (:mod:`.geometry`, :mod:`.pose`), the differentiable DRR
projector (:mod:`.drr`), realistic X-ray simulation for tests and benchmarks (:mod:`.simulate`),
the optimisation baselines ``opt-ncc``, ``opt-gc``, ``opt-ngi`` (:mod:`.optimize`), and the learned
half: the RTPI pose-initialisation network (:mod:`.rtpi`), the fine registration on learned
features (:mod:`.fine`), one patient's projectors (:mod:`.patient`), per-patient model folders
(:mod:`.model_dir`, trained by :mod:`..training.sopi_train`) and the ``sopi`` / ``sopi+opt``
pipeline (:mod:`.learned`).  :mod:`.register` is the entry point for every method.
"""

from .drr import DRRProjector, check_field_of_view, hu_to_attenuation
from .geometry import CarmGeometry, read_geometry, write_geometry
from .optimize import OptimizerSettings, optimize_pose
from .pose import geodesic_distance, pose_errors, pose_matrix
from .register import register_2d3d, render_drr

__all__ = ["CarmGeometry", "read_geometry", "write_geometry", "DRRProjector", "hu_to_attenuation",
           "check_field_of_view", "pose_matrix", "geodesic_distance", "pose_errors", "OptimizerSettings",
           "optimize_pose", "register_2d3d", "render_drr"]
