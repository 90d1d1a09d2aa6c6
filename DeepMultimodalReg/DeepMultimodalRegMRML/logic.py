"""Registration from MRML nodes to MRML nodes, without any GUI.

``RegistrationLogic(scene)`` is what the module's Widget drives and what a researcher calls from
Slicer's Python console:

    logic = RegistrationLogic(slicer.mrmlScene)
    outputs = logic.register(fixedNode, movingNode, method="disa-rigid")   # blocking
    job = logic.start_registration(fixedNode, movingNode, method="deep")    # off the GUI thread
    ...; job.poll()   # on the GUI thread: applies the result when it is ready

A registration has three phases (see ``jobs``): :meth:`prepare` copies the inputs out of the scene
(GUI thread), :meth:`compute` runs the library (any thread, touches no node), :meth:`apply` writes
the transform, the warped volume and the review maps into the scene (GUI thread).  Input volume
nodes are never written: their voxels and geometry stay as they were; the only change to the
moving node is, when asked (the default), that it is placed under the result transform for review.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from DeepMultimodalRegLib.errors import InvalidImageError, InvalidParameterError
from DeepMultimodalRegLib.image.validation import validate_registration_input
from DeepMultimodalRegLib.image.volume import Volume
from DeepMultimodalRegLib.methods import METHODS, get_method
from DeepMultimodalRegLib.methods.registry import RegistrationOptions
from DeepMultimodalRegLib.progress import CancelToken
from DeepMultimodalRegLib.result import RegistrationResult

from . import parameters as P
from .jobs import BackgroundJob
from .maps import compute_review_maps, show_map
from .transform_nodes import set_transform_node
from .volumes import node_from_volume, optional_volume_from_node, volume_from_node

MAP_ROLES = {"similarity": P.SIMILARITY_MAP, "jacobian": P.JACOBIAN_MAP, "displacement": P.DISPLACEMENT_MAP,
             "disa": P.DISA_MAP}


@dataclass
class RegistrationRequest:
    """Everything a registration needs, copied out of the scene (safe to hand to a worker thread)."""

    method: str
    fixed: Volume
    moving: Volume
    options: RegistrationOptions
    settings: dict
    fixed_node_id: str
    moving_node_id: str
    output_transform_id: Optional[str] = None
    output_volume_id: Optional[str] = None


@dataclass
class RegistrationOutputs:
    result: RegistrationResult
    transform_node: Any
    warped_node: Any
    map_nodes: dict = field(default_factory=dict)
    summary: str = ""


def _search_extra(settings: dict) -> dict:
    """The feature engine's options (disa-*, mind-*) from the module's settings."""
    extra = {}
    if settings["Search"] == "global":
        extra = {"starts": settings["Starts"], "range_deg": settings["RangeDeg"], "range_mm": settings["RangeMm"]}
    if settings["Method"].startswith("disa"):
        extra["refine"] = settings["Refine"]
    return extra


def _msode_extra(settings: dict) -> dict:
    """msode-*'s model files from the module's settings, in the runner's option names, loaded once now by
    the runner's own :func:`stage_models` so that a bad choice (missing or unreadable file, wrong kind, no
    shipped model) fails before any volume is copied."""
    from DeepMultimodalRegLib.msode.runner import stage_models

    kind = settings["Method"].split("-", 1)[1]
    model_file, rigid_file = settings["MsodeWeights"] or None, settings["MsodeRigidWeights"] or None
    if kind == "hybrid":
        extra = {"weights_rigid": rigid_file, "weights_deformable": model_file}
    else:
        extra = {"weights": model_file}
    extra = {k: v for k, v in extra.items() if v}
    stage_models(kind, extra)
    return extra


def summarise(result: RegistrationResult) -> str:
    """The status text: method, time, device, similarity before → after; then, on a line of its own,
    the known limits of the shipped weights the method used, where the manifest states any."""
    figures = result.figures
    text = f"{result.method}: {result.seconds:.1f} s on {result.device}"
    if figures.get("disa_precision") == "bfloat16":
        # said because it is machine-dependent: the same inputs give slightly different poses on a CPU
        # without native bfloat16, where the network runs in float32
        text += " (DISA network in bfloat16)"
    before, after = figures.get("similarity_before"), figures.get("similarity_after")
    if isinstance(before, (int, float)) and isinstance(after, (int, float)):
        text += f"; similarity {before:.3f} → {after:.3f}"
    if figures.get("weights_status"):
        text += f"\nWeights: {figures['weights_status']}"
    return text


class RegistrationLogic:
    """The MRML bridge of the module; holds the deep-registration session for refinement."""

    def __init__(self, scene) -> None:
        if scene is None:
            raise InvalidParameterError("an MRML scene is needed")
        self.scene = scene
        self.deep_session = None  # DeepRegistrationSession of the last `deep` registration
        self.deep_request: Optional[RegistrationRequest] = None
        self.last_outputs: Optional[RegistrationOutputs] = None

    # ---------------------------------------------------------------- parameters
    def parameter_node(self):
        return P.find_or_create_parameter_node(self.scene)

    # ---------------------------------------------------------------- phase 1: GUI thread
    def prepare(self, fixed_node, moving_node, *, method: str = "disa-rigid", output_transform_node=None,
                output_volume_node=None, fixed_mask_node=None, moving_mask_node=None,
                settings: Optional[dict] = None) -> RegistrationRequest:
        """Check the inputs and copy them out of the scene. Raises before any heavy work."""
        if fixed_node is None or moving_node is None:
            raise InvalidImageError("select both a fixed and a moving volume")
        if fixed_node is moving_node:
            raise InvalidImageError("the fixed and the moving volume are the same node; select two different volumes")
        if method not in METHODS:
            raise InvalidParameterError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        values = {name: s.default for name, s in P.SETTINGS.items()}
        values.update(settings or {})
        values["Method"] = method
        for name in ("Search", "Device", "Refine"):
            if values[name] not in P.SETTINGS[name].choices:
                raise InvalidParameterError(
                    f"{name.lower()} {values[name]!r}: choose one of {', '.join(P.SETTINGS[name].choices)}")
        get_method(method)  # NotAvailableError now, not after copying the volumes
        fixed = volume_from_node(fixed_node, "fixed")
        moving = volume_from_node(moving_node, "moving")
        validate_registration_input(fixed, "fixed", method=method)
        validate_registration_input(moving, "moving", method=method)
        options = RegistrationOptions(search=values["Search"], device=values["Device"], seed=values["Seed"],
                                      fixed_mask=optional_volume_from_node(fixed_mask_node, "fixed mask"),
                                      moving_mask=optional_volume_from_node(moving_mask_node, "moving mask"),
                                      extra=self._method_extra(method, values))
        return RegistrationRequest(method, fixed, moving, options, values, fixed_node.GetID(), moving_node.GetID(),
                                   output_transform_node.GetID() if output_transform_node else None,
                                   output_volume_node.GetID() if output_volume_node else None)

    @staticmethod
    def _method_extra(method: str, values: dict) -> dict:
        family = get_method(method).family
        if family in ("disa", "mind"):
            return _search_extra(values)
        return _msode_extra(values) if family == "msode" else {}

    # ---------------------------------------------------------------- phase 2: any thread
    def compute(self, request: RegistrationRequest, progress: Optional[Callable] = None,
                cancel: Optional[CancelToken] = None) -> tuple[RegistrationResult, dict, Any]:
        """Run the library: (result, review maps, deep session or None). Touches no MRML node."""
        options = request.options
        options.progress, options.cancel = progress, cancel or CancelToken()
        session = None
        if request.method == "deep":
            from DeepMultimodalRegLib.rso import DeepRegistrationSession

            session = DeepRegistrationSession(request.fixed, request.moving, device=options.device, seed=options.seed,
                                              weights=request.settings["DeepWeights"] or None)
            iso_iterations = request.settings["IsoIterations"]
            result = session.general(progress=progress if not iso_iterations else None, cancel=options.cancel)
            if iso_iterations:
                result = session.iso(iso_iterations, progress=progress, cancel=options.cancel)
        else:
            result = get_method(request.method).runner(request.fixed, request.moving, options)
        maps = compute_review_maps(result) if request.settings["ComputeMaps"] else {}
        return result, maps, session

    # ---------------------------------------------------------------- phase 3: GUI thread
    def apply(self, request: RegistrationRequest, computed) -> RegistrationOutputs:
        """Write the result into the scene and record it in the parameter node."""
        result, maps, session = computed
        scene = self.scene
        fixed_node = scene.GetNodeByID(request.fixed_node_id)
        moving_node = scene.GetNodeByID(request.moving_node_id)
        if fixed_node is None or moving_node is None:
            raise InvalidImageError("the fixed or moving volume was removed from the scene while registering")
        parameter_node = self.parameter_node()
        transform_node = set_transform_node(scene, result.transform, result.fixed.geometry,
                                            node=scene.GetNodeByID(request.output_transform_id or ""),
                                            name=f"{moving_node.GetName()} to {fixed_node.GetName()} ({result.method})")
        warped_node = node_from_volume(scene, result.warped, name=f"{moving_node.GetName()} registered",
                                       node=scene.GetNodeByID(request.output_volume_id or ""))
        map_nodes = {}
        for name, volume in maps.items():
            role = MAP_ROLES[name]
            map_nodes[name] = show_map(scene, name, volume, node=parameter_node.GetNodeReference(role),
                                       prefix=f"{moving_node.GetName()} ")
        if request.settings["ShowMovingUnderTransform"]:
            moving_node.SetAndObserveTransformNodeID(transform_node.GetID())
        was_modifying = parameter_node.StartModify()
        parameter_node.SetNodeReferenceID(P.FIXED_VOLUME, fixed_node.GetID())
        parameter_node.SetNodeReferenceID(P.MOVING_VOLUME, moving_node.GetID())
        parameter_node.SetNodeReferenceID(P.OUTPUT_TRANSFORM, transform_node.GetID())
        parameter_node.SetNodeReferenceID(P.OUTPUT_VOLUME, warped_node.GetID())
        for name, node in map_nodes.items():
            parameter_node.SetNodeReferenceID(MAP_ROLES[name], node.GetID())
        parameter_node.EndModify(was_modifying)
        if session is not None:
            self.deep_session, self.deep_request = session, request
        outputs = RegistrationOutputs(result, transform_node, warped_node, map_nodes, summarise(result))
        self.last_outputs = outputs
        return outputs

    # ---------------------------------------------------------------- both together
    def register(self, fixed_node, moving_node, progress=None, cancel=None, **kwargs) -> RegistrationOutputs:
        """Blocking registration (console scripts, the self-test)."""
        request = self.prepare(fixed_node, moving_node, **kwargs)
        return self.apply(request, self.compute(request, progress, cancel))

    def start_registration(self, fixed_node, moving_node, on_done: Optional[Callable] = None,
                           on_failure: Optional[Callable] = None, **kwargs) -> BackgroundJob:
        """Registration off the GUI thread; the result is applied by the job's ``poll()``."""
        request = self.prepare(fixed_node, moving_node, **kwargs)

        def applied(computed):
            outputs = self.apply(request, computed)
            if on_done is not None:
                on_done(outputs)

        return BackgroundJob(lambda progress, cancel: self.compute(request, progress, cancel),
                             on_success=applied, on_failure=on_failure, name=request.method)

    def settings_from_parameter_node(self) -> dict:
        return P.settings(self.parameter_node())

    def register_from_parameter_node(self, **kwargs) -> RegistrationOutputs:
        """Blocking registration with every setting and node taken from the parameter node."""
        node = self.parameter_node()
        settings = P.settings(node)
        return self.register(node.GetNodeReference(P.FIXED_VOLUME), node.GetNodeReference(P.MOVING_VOLUME),
                             method=settings["Method"], settings=settings,
                             output_transform_node=node.GetNodeReference(P.OUTPUT_TRANSFORM),
                             output_volume_node=node.GetNodeReference(P.OUTPUT_VOLUME),
                             fixed_mask_node=node.GetNodeReference(P.FIXED_MASK),
                             moving_mask_node=node.GetNodeReference(P.MOVING_MASK), **kwargs)

