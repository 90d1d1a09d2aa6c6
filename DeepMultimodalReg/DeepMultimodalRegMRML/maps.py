"""Review maps: where the registration agrees, where it folds, how far it moves.

Computed by the library (on the worker thread) on a review grid no finer than 2 mm, so that a
512² CT costs seconds, then shown as volume nodes (on the GUI thread) with colour tables that read
at a glance:

- ``local LC²``: patch LC² (radius 3) of the fixed image explained by the warped moving image —
  the similarity DISA approximates; 0 = no local agreement, 1 = full;
- ``Jacobian determinant`` (non-linear results): 1 = volume kept, < 1 shrinking, ≤ 0 folding;
- ``displacement``: |T(x) − x| in mm;
- ``disa`` (DISA methods): the dot product of the DISA descriptors of the fixed and the registered
  moving image at each 8 mm descriptor location — the network's own approximation of LC², so
  comparing it with ``local LC²`` shows where the learned similarity can be trusted.
"""

from __future__ import annotations

import numpy as np
import torch

from DeepMultimodalRegLib.image.volume import Volume
from DeepMultimodalRegLib.metrics.lc2 import lc2_map
from DeepMultimodalRegLib.result import RegistrationResult
from DeepMultimodalRegLib.transforms.displacement import DisplacementFieldTransform
from DeepMultimodalRegLib.transforms.jacobian import jacobian_determinant
from DeepMultimodalRegLib.transforms.linear import AffineTransform
from DeepMultimodalRegLib.transforms.resample import warp_volume

from .volumes import node_from_volume

#: Maps are computed on a grid at least this coarse (mm).
REVIEW_SPACING_MM = 2.0
LC2_RADIUS = 3

#: name → (preferred colour nodes, first present wins; window (low, high) or None for auto)
MAP_DISPLAY = {
    "similarity": (("vtkMRMLColorTableNodeFileViridis.txt", "vtkMRMLColorTableNodeRainbow"), (0.0, 1.0)),
    "jacobian": (("vtkMRMLColorTableNodeFileColdToHotRainbow.txt", "vtkMRMLColorTableNodeRainbow"), (0.0, 2.0)),
    "displacement": (("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeIron"), None),
    "disa": (("vtkMRMLColorTableNodeFileViridis.txt", "vtkMRMLColorTableNodeRainbow"), (0.0, 1.0)),
}
MAP_TITLES = {"similarity": "local LC2", "jacobian": "Jacobian determinant", "displacement": "displacement (mm)",
              "disa": "local DISA"}


def review_geometry(result: RegistrationResult):
    geometry = result.fixed.geometry
    spacing = np.maximum(np.asarray(geometry.spacing), REVIEW_SPACING_MM)
    return geometry if np.allclose(spacing, geometry.spacing) else geometry.resampled(tuple(spacing))


def compute_review_maps(result: RegistrationResult) -> dict[str, Volume]:
    """The maps of a result, each a Volume on the review grid (library only: safe off the GUI thread)."""
    grid = review_geometry(result)
    identity = AffineTransform.identity()
    with torch.no_grad():
        fixed = warp_volume(result.fixed.float(), identity, grid)
        warped = warp_volume(result.moving.float(), result.transform.detach(), grid)
        maps = {"similarity": Volume(lc2_map(fixed.data, warped.data, radius=LC2_RADIUS).float(), grid,
                                     name="local LC2")}
        field = DisplacementFieldTransform.from_transform(result.transform.detach(), grid)
        maps["displacement"] = Volume(field.field[0].norm(dim=0), grid, name="displacement")
        if not result.transform.is_linear:
            maps["jacobian"] = jacobian_determinant(field, grid)
        if result.method.startswith("disa"):
            maps["disa"] = disa_similarity_map(result)
    return maps


def disa_similarity_map(result: RegistrationResult) -> Volume:
    """⟨φ(fixed), φ(registered moving)⟩ on the DISA descriptor grid (both images share the fixed grid)."""
    from DeepMultimodalRegLib.device import resolve_device
    from DeepMultimodalRegLib.disa.preprocess import DISA_SPACING_MM, prepare_for_disa
    from DeepMultimodalRegLib.networks.disa_net import compute_descriptors, load_disa_network

    device = resolve_device(result.device.split(" ")[0] if result.device else "cpu")
    model = load_disa_network("disa", device=device)
    phi_fixed, grid = compute_descriptors(model, prepare_for_disa(result.fixed, DISA_SPACING_MM), device)
    phi_warped, _ = compute_descriptors(model, prepare_for_disa(result.warped, DISA_SPACING_MM), device)
    return Volume((phi_fixed * phi_warped).sum(0).float().cpu(), grid, name="local DISA")


def show_map(scene, name: str, volume: Volume, node=None, prefix: str = ""):
    """Create or update the volume node of map ``name`` with its colour table and window."""
    node = node_from_volume(scene, volume, name=f"{prefix}{MAP_TITLES[name]}", node=node)
    display = node.GetDisplayNode()
    colours, window = MAP_DISPLAY[name]
    for colour in colours:
        if scene.GetNodeByID(colour) is not None or colour == colours[-1]:
            display.SetAndObserveColorNodeID(colour)
            break
    if window is None:
        values = volume.data.float()
        window = (0.0, float(torch.quantile(values.flatten()[:: max(1, values.numel() // 200000)], 0.99)) or 1.0)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(*window)
    return node
