"""The module's parameter node: every setting and every node reference, typed and defaulted.

MRML stores parameters as strings on a ``vtkMRMLScriptedModuleNode`` and node references by role;
both are saved with the scene, so reopening a scene restores the module's state.  This schema is
the single list of what the module keeps: the Widget binds its controls to these names, the Logic
reads them with their types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from DeepMultimodalRegLib.errors import InvalidParameterError
from DeepMultimodalRegLib.methods import METHODS
from DeepMultimodalRegLib.sopi.register import METHODS_2D3D

MODULE_NAME = "DeepMultimodalReg"


@dataclass(frozen=True)
class Setting:
    name: str
    kind: type  # str, int, float or bool
    default: Any
    choices: tuple = ()
    help: str = ""


SETTINGS = {s.name: s for s in [
    Setting("Method", str, "disa-rigid", tuple(METHODS), "registration method (as the command line spells it)"),
    Setting("Search", str, "local", ("local", "global"), "local: from the image centres; global: many random starts"),
    Setting("Device", str, "auto", ("auto", "cpu", "cuda"), "auto: the CUDA GPU when usable, else the CPU"),
    Setting("Seed", int, 0, (), "seed of every random choice (global-search starts, network initialisation)"),
    Setting("Starts", int, 500, (), "global search: number of random starting poses"),
    Setting("RangeDeg", float, 40.0, (), "global search: rotations within ± this (degrees)"),
    Setting("RangeMm", float, 150.0, (), "global search: translations within ± this (mm)"),
    Setting("Refine", str, "disa", ("disa", "mind", "none"),
            "disa-*: polish the DISA pose locally on DISA descriptors of the moving image resampled at it (disa), "
            "on MIND-SSC features (mind), or not at all (none)"),
    Setting("IsoIterations", int, 100, (), "image-specific optimisation: iterations over the whole image"),
    Setting("RsoIterations", int, 400, (), "region-specific optimisation: iterations per box"),
    Setting("RsoCrop", bool, True, (), "region-specific optimisation on a crop around the box (faster)"),
    Setting("RsoSpacing", float, 0.0, (), "spacing (mm) of the crop's grid; finer than the working grid refines the "
            "registration there; 0 = automatic"),
    Setting("AutoRefine", bool, True, (), "start a refinement when the ROI's handles are released"),
    Setting("ShowMovingUnderTransform", bool, True, (), "place the moving volume under the result for review"),
    Setting("ComputeMaps", bool, True, (), "add review maps: local similarity, Jacobian determinant, displacement"),
    Setting("DeepWeights", str, "", (), "weights file of the general deep model (empty: the shipped network)"),
    Setting("MsodeWeights", str, "", (), "MS-ODE model file (`deepmmreg train msode`) for msode-rigid, -bspline, "
            "-dense, and msode-hybrid's deformable stage (empty: the shipped model of that kind, or for B-spline "
            "stages the untrained gradient flow while no trained B-spline model ships)"),
    Setting("MsodeRigidWeights", str, "", (), "msode-hybrid's rigid stage model file (empty: the shipped rigid model)"),
    Setting("GeometryFile", str, "", (), "C-arm geometry JSON for 2D/3D registration"),
    Setting("SopiModelDir", str, "", (), "folder of the per-patient SOPI networks (sopi, sopi+opt)"),
    Setting("Method2D3D", str, "opt-gc", tuple(METHODS_2D3D),
            "2D/3D registration method (as `deepmmreg register2d3d --method` spells it)"),
]}

#: Node-reference roles.
FIXED_VOLUME = "FixedVolume"
MOVING_VOLUME = "MovingVolume"
FIXED_MASK = "FixedMask"
MOVING_MASK = "MovingMask"
OUTPUT_TRANSFORM = "OutputTransform"
OUTPUT_VOLUME = "OutputVolume"
REFINEMENT_ROI = "RefinementROI"
SIMILARITY_MAP = "SimilarityMap"
JACOBIAN_MAP = "JacobianMap"
DISPLACEMENT_MAP = "DisplacementMap"
DISA_MAP = "DisaSimilarityMap"
CT_VOLUME = "CTVolume"
XRAY_VOLUME = "XRayVolume"
DRR_VOLUME = "DRRVolume"
POSE_TRANSFORM = "PoseTransform"
REFERENCE_ROLES = (FIXED_VOLUME, MOVING_VOLUME, FIXED_MASK, MOVING_MASK, OUTPUT_TRANSFORM, OUTPUT_VOLUME,
                   REFINEMENT_ROI, SIMILARITY_MAP, JACOBIAN_MAP, DISPLACEMENT_MAP, DISA_MAP, CT_VOLUME, XRAY_VOLUME, DRR_VOLUME,
                   POSE_TRANSFORM)


def find_or_create_parameter_node(scene, module_name: str = MODULE_NAME):
    """The module's singleton parameter node in ``scene`` (what Slicer's ``getParameterNode`` returns)."""
    node = scene.GetSingletonNode(module_name, "vtkMRMLScriptedModuleNode")
    if node is None:
        node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)  # CreateNodeByClass hands over a reference Python already holds
        node.SetSingletonTag(module_name)
        node.SetName(scene.GenerateUniqueName(module_name))
        node.SetAttribute("ModuleName", module_name)
        node = scene.AddNode(node)
    set_defaults(node)
    return node


def set_defaults(node) -> None:
    """Fill in the settings that are not set yet (values already there are kept)."""
    was_modifying = node.StartModify()
    for setting in SETTINGS.values():
        if not node.GetParameter(setting.name):
            node.SetParameter(setting.name, _to_text(setting, setting.default))
    node.EndModify(was_modifying)


def _to_text(setting: Setting, value) -> str:
    if setting.kind is bool:
        return "true" if value else "false"
    return str(value)


def get(node, name: str):
    """The setting ``name`` read from the node with its type (its default when unset)."""
    setting = SETTINGS[name]
    text = node.GetParameter(name)
    if not text:
        return setting.default
    try:
        if setting.kind is bool:
            return text.lower() in ("1", "true", "yes", "on")
        value = setting.kind(text)
    except ValueError as error:
        raise InvalidParameterError(f"module setting {name} = {text!r} is not a valid {setting.kind.__name__}") from error
    if setting.choices and value not in setting.choices:
        raise InvalidParameterError(f"module setting {name} = {value!r}; choose one of {', '.join(setting.choices)}")
    return value


def set(node, name: str, value) -> None:  # noqa: A001 - mirrors get()
    setting = SETTINGS[name]
    if setting.kind is not str and not isinstance(value, (bool, int, float)):
        raise InvalidParameterError(f"module setting {name} needs a {setting.kind.__name__}, got {value!r}")
    if setting.choices and value not in setting.choices:
        raise InvalidParameterError(f"module setting {name} = {value!r}; choose one of {', '.join(setting.choices)}")
    node.SetParameter(name, _to_text(setting, setting.kind(value)))


def settings(node) -> dict:
    """Every setting, typed."""
    return {name: get(node, name) for name in SETTINGS}
