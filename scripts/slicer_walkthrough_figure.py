"""Draw what the Slicer module shows at each step of the review-and-refine workflow.

Slicer cannot run on the machines that build this project, so the README's walkthrough pictures
are drawn from the module's own Logic running on real MRML (slicer-core): the same nodes the
module puts in the scene (registered volume, local-LC² map, Jacobian map, the refinement box),
shown as axial slices through the box.  Usage (from the repository root):

    .venv/bin/python scripts/slicer_walkthrough_figure.py -o docs/images/slicer_walkthrough.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import slicer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DeepMultimodalReg"))
sys.path.insert(0, str(REPO))

from DeepMultimodalRegLib.sample_data import load_sample  # noqa: E402
from DeepMultimodalRegLib.synthetic import smooth_random_deformation  # noqa: E402
from DeepMultimodalRegLib.transforms.resample import warp_volume  # noqa: E402
from DeepMultimodalRegMRML import parameters as P  # noqa: E402
from DeepMultimodalRegMRML.logic import RegistrationLogic  # noqa: E402
from DeepMultimodalRegMRML.refinement import RoiRefinement  # noqa: E402
from DeepMultimodalRegMRML.roi import box_from_roi  # noqa: E402
from DeepMultimodalRegMRML.volumes import node_from_volume, volume_from_node  # noqa: E402

def _axial(volume_node, k):
    return slicer.util.arrayFromVolume(volume_node)[k]


def _box_outline(ax, box, geometry, k):
    mask = box.mask(geometry).numpy()[k]
    if mask.any():
        ax.contour(mask.astype(float), levels=[0.5], colors="yellow", linewidths=1.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=REPO / "docs" / "images" / "slicer_walkthrough.png")
    parser.add_argument("--iso", type=int, default=100)
    parser.add_argument("--rso", type=int, default=200)
    args = parser.parse_args()

    scene = slicer.vtkMRMLScene()
    colours = slicer.vtkMRMLColorLogic()
    colours.SetMRMLScene(scene)
    fixed = load_sample("ct_pelvis").float()
    deformation = smooth_random_deformation(fixed.geometry, 8.0, 60.0, seed=7)
    moving = warp_volume(fixed, deformation, fixed.geometry, default_value=-1000.0)
    moving.name = "pelvis, deformed"
    fixed_node = node_from_volume(scene, fixed, name="fixed CT")
    moving_node = node_from_volume(scene, moving, name="moving CT")

    logic = RegistrationLogic(scene)
    settings = {"Device": "cpu", "IsoIterations": args.iso, "RsoIterations": args.rso}
    for name, value in settings.items():
        P.set(logic.parameter_node(), name, value)
    outputs = logic.register(fixed_node, moving_node, method="deep", settings=settings)
    parameter_node = logic.parameter_node()
    refinement = RoiRefinement(logic)
    roi = refinement.place_roi()  # at the worst local similarity, as the button does
    box = box_from_roi(roi, fixed_node)
    m = fixed.geometry.physical_to_index_matrix()
    k = int(round((m[:3, :3] @ np.asarray(box.center) + m[:3, 3])[2]))  # the axial slice through the box centre
    after_deep = _axial(outputs.warped_node, k).copy()
    similarity = volume_from_node(parameter_node.GetNodeReference(P.SIMILARITY_MAP))
    similarity_on_fixed = warp_volume(similarity, _identity(), fixed.geometry).data.numpy()[k]
    jacobian = volume_from_node(parameter_node.GetNodeReference(P.JACOBIAN_MAP))
    jacobian_on_fixed = warp_volume(jacobian, _identity(), fixed.geometry, default_value=1.0).data.numpy()[k]
    job = refinement.refine(roi)
    if job.wait() != "succeeded":
        raise SystemExit(f"refinement failed: {job.error}")
    after_rso = _axial(outputs.warped_node, k)

    fixed_slice = _axial(fixed_node, k)
    window = dict(cmap="gray", vmin=-300, vmax=500)
    panels = [("1. fixed (reference)", fixed_slice, window), ("moving before", _axial(moving_node, k), window),
              ("2. after deep + ISO", after_deep, window), ("3. local LC² (worst → box)", similarity_on_fixed,
                                                               dict(cmap="viridis", vmin=0, vmax=1)),
              ("Jacobian determinant", jacobian_on_fixed, dict(cmap="coolwarm", vmin=0, vmax=2)),
              ("4. after RSO in the box", after_rso, window)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, (title, image, style) in zip(axes, panels):
        ax.imshow(image, origin="lower", **style)
        _box_outline(ax, box, fixed.geometry, k)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle("Deep Multimodal Registration in Slicer: review and refine (drawn from the module's Logic on real MRML)",
                 fontsize=10)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(args.output, "|", outputs.summary, "|", "; ".join(refinement.history()))
    return 0


def _identity():
    from DeepMultimodalRegLib.transforms.linear import AffineTransform

    return AffineTransform.identity()


if __name__ == "__main__":
    raise SystemExit(main())
