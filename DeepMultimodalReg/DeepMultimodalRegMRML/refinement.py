"""Interactive refinement driven by a Markups ROI: the review-and-refine loop of the RSO paper.

After a ``deep`` registration the clinician draws a box where the result is wrong.  When
auto-refine is on, releasing the ROI's handles (the markups end-of-interaction event) starts a
region-specific optimisation (RSO) in that box on a worker thread; moving the ROI again while a
step runs cancels that step (the session restores its state) and starts a new one.  Each finished
step updates the result transform node and the warped volume at once, keeps a locked copy of its
box for review, and can be undone and redone.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import slicer
import torch

from DeepMultimodalRegLib.errors import InvalidParameterError
from DeepMultimodalRegLib.image.volume import Volume
from DeepMultimodalRegLib.region import Box
from DeepMultimodalRegLib.transforms.linear import AffineTransform
from DeepMultimodalRegLib.transforms.resample import warp_volume

from . import parameters as P
from .coordinates import lps_from_ras_points
from .jobs import RUNNING, BackgroundJob
from .logic import MAP_ROLES
from .maps import compute_review_maps, show_map
from .roi import box_from_roi, default_roi_size, roi_from_box
from .transform_nodes import set_transform_node
from .volumes import node_from_volume, volume_from_node

END_INTERACTION = slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent


def worst_similarity_center(similarity: Volume, box_size_mm, foreground: Optional[Volume] = None) -> np.ndarray:
    """LPS centre of the box-sized neighbourhood with the lowest mean local similarity.

    Only neighbourhoods that are mostly foreground count (``foreground``: the fixed image on the
    same grid; flat background has no similarity to speak of)."""
    values = similarity.data.float()[None, None]
    radius = [max(1, int(round(s / 2 / sp))) for s, sp in zip(np.asarray(box_size_mm)[::-1],
                                                              np.asarray(similarity.geometry.spacing)[::-1])]
    kernel = tuple(2 * r + 1 for r in radius)
    mean = torch.nn.functional.avg_pool3d(values, kernel, stride=1, padding=tuple(radius), count_include_pad=False)[0, 0]
    if foreground is not None:
        data = foreground.data.float()
        inside = (data > torch.quantile(data.flatten()[:: max(1, data.numel() // 100000)], 0.5)).float()[None, None]
        share = torch.nn.functional.avg_pool3d(inside, kernel, stride=1, padding=tuple(radius),
                                               count_include_pad=False)[0, 0]
        mean = torch.where(share > 0.5, mean, torch.full_like(mean, float("inf")))
    # only centres whose whole box lies in the image: a box hanging over the edge refines nothing there
    inside = torch.zeros_like(mean, dtype=torch.bool)
    bounds = []
    for axis, r in enumerate(radius):
        n = mean.shape[axis]
        bounds.append(slice(r, n - r) if n > 2 * r else slice(n // 2, n // 2 + 1))
    inside[tuple(bounds)] = True
    mean = torch.where(inside, mean, torch.full_like(mean, float("inf")))
    k, j, i = np.unravel_index(int(torch.argmin(mean)), tuple(mean.shape))
    m = similarity.geometry.index_to_physical_matrix()
    return m[:3, :3] @ np.array([i, j, k], dtype=np.float64) + m[:3, 3]


class RoiRefinement:
    """RSO steps started from an ROI node, applied to the scene of ``logic`` (a RegistrationLogic)."""

    def __init__(self, logic) -> None:
        self.logic = logic
        self.scene = logic.scene
        self.job: Optional[BackgroundJob] = None
        self.review_boxes: list = []
        self.step_listeners: list[Callable] = []
        self.failure_listeners: list[Callable] = []
        self._roi = None
        self._observer = None

    # ---------------------------------------------------------------- state
    @property
    def session(self):
        if self.logic.deep_session is None:
            raise InvalidParameterError("refinement needs a deep registration first: run the 'deep' method")
        return self.logic.deep_session

    @property
    def busy(self) -> bool:
        return self.job is not None and self.job.status == RUNNING

    def _fixed_node(self):
        return self.scene.GetNodeByID(self.logic.deep_request.fixed_node_id)

    def _settings(self) -> dict:
        return P.settings(self.logic.parameter_node())

    # ---------------------------------------------------------------- the ROI
    def place_roi(self, center_ras=None, size_mm=None, name: str = "Refinement box"):
        """A new ROI around ``center_ras`` (e.g. the view centre) or, when None, where the local
        similarity of the current result is worst; it becomes the module's refinement ROI."""
        session = self.session
        size = tuple(size_mm) if size_mm is not None else default_roi_size(session.fixed.geometry)
        if center_ras is not None:
            center = lps_from_ras_points(center_ras)
        else:
            similarity_node = self.logic.parameter_node().GetNodeReference(P.SIMILARITY_MAP)
            if similarity_node is None:
                center = session.fixed.geometry.center
            else:
                similarity = volume_from_node(similarity_node, "similarity map")
                fixed_on_map = warp_volume(session.fixed.float(), AffineTransform.identity(), similarity.geometry)
                center = worst_similarity_center(similarity, size, fixed_on_map)
        roi = roi_from_box(self.scene, Box(tuple(center), size), name=name, fixed_node=self._fixed_node())
        self.logic.parameter_node().SetNodeReferenceID(P.REFINEMENT_ROI, roi.GetID())
        self.attach(roi)
        return roi

    def attach(self, roi_node) -> None:
        """Refine when the user releases ``roi_node``'s handles (if auto-refine is on)."""
        self.detach()
        self._roi = roi_node
        self._observer = roi_node.AddObserver(END_INTERACTION, self._on_end_interaction)

    def detach(self) -> None:
        if self._roi is not None and self._observer is not None:
            self._roi.RemoveObserver(self._observer)
        self._roi, self._observer = None, None

    def _on_end_interaction(self, caller, event) -> None:
        if self._settings()["AutoRefine"]:
            self.refine(caller)

    # ---------------------------------------------------------------- steps
    def refine(self, roi_node=None, iterations: Optional[int] = None) -> BackgroundJob:
        """Start an RSO step in the ROI's box; a step still running is cancelled and replaced."""
        roi_node = roi_node or self._roi
        box = box_from_roi(roi_node, self._fixed_node())  # GUI thread: reads the node now
        settings = self._settings()
        count = iterations or settings["RsoIterations"]
        session = self.session

        def work(progress, cancel):
            spacing = settings["RsoSpacing"] if settings["RsoSpacing"] > 0 else None  # 0 = automatic
            result = session.rso(box, count, crop=settings["RsoCrop"], progress=progress, cancel=cancel,
                                 spacing_mm=spacing)
            return result, self._maps(result, settings)

        return self._start(work, box, "rso")

    def iso(self, iterations: Optional[int] = None) -> BackgroundJob:
        """Start a whole-image refinement (image-specific optimisation)."""
        settings = self._settings()
        count = iterations or settings["IsoIterations"]
        session = self.session

        def work(progress, cancel):
            result = session.iso(count, progress=progress, cancel=cancel)
            return result, self._maps(result, settings)

        return self._start(work, None, "iso")

    @staticmethod
    def _maps(result, settings) -> dict:
        return compute_review_maps(result) if settings["ComputeMaps"] else {}

    def _start(self, work, box: Optional[Box], kind: str) -> BackgroundJob:
        previous = self.job
        if previous is not None and previous.status == RUNNING:
            previous.cancel()  # the session restores its state; the new step waits for that
        self.job = BackgroundJob(work, on_success=lambda computed: self._apply(*computed, box),
                                 on_failure=self._failed, name=kind, after=previous)
        return self.job

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def _failed(self, error: BaseException) -> None:
        for listener in self.failure_listeners:
            listener(error)

    # ---------------------------------------------------------------- GUI thread
    def _apply(self, result, maps: dict, box: Optional[Box]) -> None:
        self.show_current()
        parameter_node = self.logic.parameter_node()
        for name, volume in maps.items():
            role = MAP_ROLES[name]
            node = show_map(self.scene, name, volume, node=parameter_node.GetNodeReference(role))
            parameter_node.SetNodeReferenceID(role, node.GetID())
        if box is not None:
            review = roi_from_box(self.scene, box, name=f"RSO box {len(self.review_boxes) + 1}",
                                  fixed_node=self._fixed_node())
            review.SetLocked(True)
            self.review_boxes.append(review)
        for listener in self.step_listeners:
            listener(result)

    def show_current(self) -> None:
        """Put the session's current field into the result transform node and the warped volume."""
        result = self.session.current()
        if result is None:
            return
        outputs = self.logic.last_outputs
        set_transform_node(self.scene, result.transform, result.fixed.geometry, node=outputs.transform_node)
        node_from_volume(self.scene, result.warped, node=outputs.warped_node)

    def undo(self) -> bool:
        if self.busy:
            raise InvalidParameterError("a refinement is running; cancel it before undoing")
        if len(self.session.history) <= 1:
            return False  # the first registration stays: there is nothing before it to show
        changed = self.session.undo()
        if changed:
            self.show_current()
        return changed

    def redo(self) -> bool:
        if self.busy:
            raise InvalidParameterError("a refinement is running; cancel it before redoing")
        changed = self.session.redo()
        if changed:
            self.show_current()
        return changed

    def history(self) -> list[str]:
        """One line per step of the current state, for the history list."""
        lines = []
        for step in self.session.history:
            figures = step.figures
            text = f"{step.name}: {step.iterations} it, {step.seconds:.1f} s"
            if isinstance(figures.get("loss_before"), float) and isinstance(figures.get("loss_after"), float):
                text += f", loss {figures['loss_before']:.4g} → {figures['loss_after']:.4g}"
            lines.append(text)
        return lines
