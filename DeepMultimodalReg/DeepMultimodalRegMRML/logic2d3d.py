"""2D/3D registration from nodes: a CT volume node and an X-ray (a single-slice volume node).

Same three phases as :mod:`.logic` (copy out on the GUI thread, compute anywhere, apply on the
GUI thread).  Into the scene go:

- a linear transform node holding the found rigid map from the C-arm frame (mm, origin at the
  isocentre) to the CT (the library's ``transform.tfm``, "from parent" direction);
- the DRR at the found pose as a single-slice volume node on the X-ray's own grid, so it overlays
  the X-ray in the slice views;
- the pose (rx, ry, rz in degrees, tx, ty, tz in mm, the convention of ``deepmmreg drr --pose``) as
  attributes of the transform node and in the status line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from DeepMultimodalRegLib.errors import InvalidImageError, InvalidParameterError
from DeepMultimodalRegLib.image.volume import Volume
from DeepMultimodalRegLib.progress import CancelToken
from DeepMultimodalRegLib.sopi.geometry import CarmGeometry, read_geometry
from DeepMultimodalRegLib.sopi.pose import POSE_KEYS, pose_to_dict
from DeepMultimodalRegLib.sopi.model_dir import load_model_dir
from DeepMultimodalRegLib.sopi.register import LEARNED_METHODS, METHODS_2D3D, require_method_available, validate_ct
from DeepMultimodalRegLib.sopi.xray import fit_geometry_to_xray

from .jobs import BackgroundJob
from .transform_nodes import set_transform_node
from .volumes import node_from_volume, volume_from_node


@dataclass
class Request2D3D:
    method: str
    ct: Volume
    xray: Volume  # (1, H, W)
    geometry: CarmGeometry
    device: str
    seed: int
    ct_node_id: str
    xray_node_id: str
    optimizer_settings: Any = None  # the library's OptimizerSettings; None = its defaults
    model_dir: Optional[str] = None  # per-patient SOPI networks (sopi, sopi+opt)


@dataclass
class Outputs2D3D:
    result: Any  # the library's Registration2D3DResult
    transform_node: Any
    drr_node: Any
    summary: str


def prepare_2d3d(ct_node, xray_node, geometry_file: str, method: str = "opt-gc", device: str = "auto",
                 seed: int = 0, optimizer_settings=None, model_dir: str = "") -> Request2D3D:
    """Check and copy the inputs; errors before any heavy work (a SOPI model that does not fit the
    CT or the C-arm is refused here too)."""
    if method not in METHODS_2D3D:
        raise InvalidParameterError(f"unknown 2D/3D method {method!r}; choose one of {', '.join(METHODS_2D3D)}")
    model_dir = model_dir or None
    require_method_available(method, model_dir)
    if ct_node is None or xray_node is None:
        raise InvalidImageError("select both a CT volume and an X-ray image")
    if not geometry_file:
        raise InvalidParameterError("2D/3D registration needs the C-arm geometry file (JSON); see "
                                    "Resources/Geometry/carm_geometry.json for an example")
    ct = volume_from_node(ct_node, "CT")
    validate_ct(ct)
    xray = volume_from_node(xray_node, "X-ray")
    if not xray.geometry.is_2d() or xray.shape[0] != 1:
        raise InvalidImageError(f"the X-ray '{xray_node.GetName()}' has {xray.shape[0]} slices; a single 2D "
                                "radiograph (one slice) is needed")
    geometry = fit_geometry_to_xray(read_geometry(geometry_file), tuple(xray.shape[1:]))
    if method in LEARNED_METHODS:
        load_model_dir(model_dir, ct, geometry)  # checks only; the worker loads it again
    return Request2D3D(method, ct, xray, geometry, device, seed, ct_node.GetID(), xray_node.GetID(),
                       optimizer_settings, model_dir)


def compute_2d3d(request: Request2D3D, progress: Optional[Callable] = None, cancel: Optional[CancelToken] = None):
    from DeepMultimodalRegLib.sopi.register import register_2d3d

    return register_2d3d(request.ct, request.xray.data[0], request.geometry, method=request.method,
                         settings=request.optimizer_settings, device=request.device, seed=request.seed,
                         progress=progress, cancel=cancel, model_dir=request.model_dir,
                         ct_name=request.ct.name, xray_name=request.xray.name)


def apply_2d3d(scene, request: Request2D3D, result, transform_node=None, drr_node=None) -> Outputs2D3D:
    xray_node = scene.GetNodeByID(request.xray_node_id)
    if xray_node is None:
        raise InvalidImageError("the X-ray was removed from the scene while registering")
    transform = result.transform()
    transform_node = set_transform_node(scene, transform, request.ct.geometry, node=transform_node,
                                        name=f"C-arm to {request.ct.name} ({result.method})")
    pose = pose_to_dict(result.pose)
    for key in POSE_KEYS:
        transform_node.SetAttribute(f"DeepMultimodalReg.pose.{key}", f"{pose[key]:.6f}")
    drr = Volume(result.drr[None].float(), request.xray.geometry, name=f"DRR of {request.ct.name}")
    drr_node = node_from_volume(scene, drr, name=drr.name, node=drr_node)
    summary = (f"{result.method}: pose " + " ".join(f"{k}={pose[k]:.2f}" for k in POSE_KEYS)
               + f" (degrees, mm); {result.seconds:.1f} s on {result.device}")
    return Outputs2D3D(result, transform_node, drr_node, summary)


def start_2d3d(scene, ct_node, xray_node, geometry_file: str, on_done: Optional[Callable] = None,
               on_failure: Optional[Callable] = None, **kwargs) -> BackgroundJob:
    request = prepare_2d3d(ct_node, xray_node, geometry_file, **kwargs)

    def applied(result):
        outputs = apply_2d3d(scene, request, result)
        if on_done is not None:
            on_done(outputs)

    return BackgroundJob(lambda progress, cancel: compute_2d3d(request, progress, cancel), on_success=applied,
                         on_failure=on_failure, name=request.method)
