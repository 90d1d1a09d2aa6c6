"""The interactive session: general model → ISO → RSO (repeated), with undo/redo and a step history.

The session keeps the network weights and the current displacement field between steps, so each
step warm-starts from the last (the paper's three-step workflow, Algorithm 1):

* :meth:`general` — a forward pass of the general (population) model;
* :meth:`iso` — image-specific optimisation: all weights fine-tuned on this pair, loss over the
  whole image (paper eq. 3), Adam 3e-4;
* :meth:`rso` — region-specific optimisation: the same, with the similarity restricted to a box
  (paper eq. 6).  Beyond the paper, ``crop=True`` feeds the network only a block around the box
  (the box grown by the largest current displacement in it plus context), so a step costs a
  fraction of a whole-image step; and the new field replaces the old one only in and around the
  box (a smooth blend), so a refinement of one region never disturbs the rest.  A cropped step can
  also run at a finer spacing than the working grid (``spacing_mm``; :mod:`.fine_patch`): it then
  refines the current registration with a residual on a local grid around the box.

The session is used from one worker thread at a time.  ``progress(fraction, message)`` is called
between iterations; a cancelled :class:`CancelToken` raises :class:`CancelledError` after restoring
the exact state from before the call.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..device import describe_device, resolve_device, seed_everything
from ..errors import InvalidParameterError
from ..fileio import atomic_output
from ..image.geometry import ImageGeometry
from ..image.validation import validate_registration_input
from ..image.volume import Volume
from ..progress import CancelToken, ProgressCallback, ProgressScope
from ..region import Box
from ..result import RegistrationResult, RegistrationStep
from ..transforms.resample import warp_volume
from .fine_patch import FinePatch, change_of_displacement, local_grid, resample_onto
from .losses import DEFAULT_FINE_SIMILARITY, DEFAULT_FINE_SMOOTHNESS, DEFAULT_SMOOTHNESS, Similarity, disa_targets, smoothness
from .prepare import guess_modality, normalise
from .weights import load_general_model
from .working_grid import (Crop, choose_spacing, crop_around, field_to_fixed, mm_to_voxels, to_working, voxels_to_mm,
                           warp_on_grid, working_geometry)

#: a box must cover at least this many voxels of the working grid (inside the fixed image)
MIN_BOX_VOXELS = 8
#: context (mm) added around box + displacement when cropping the network's input
CROP_CONTEXT_MM = 24.0
#: automatic RSO spacing: at most this many voxels in the local grid of a cropped step (64³) ...
MAX_FINE_VOXELS = 64 ** 3
#: ... and no finer than the fixed image's own spacing nor a quarter of the working spacing
FINEST_FRACTION_OF_WORKING = 0.25
SESSION_FILE = "deep_session.pt"
SESSION_JSON = "deep_session.json"


@dataclass(eq=False)
class _State:
    weights: dict[str, torch.Tensor]
    field: torch.Tensor  # [1, 3, D, H, W] working voxels, on the session's device
    step: RegistrationStep
    result: RegistrationResult | None = None
    #: refinements at a finer spacing, applied over ``field`` in order (ISO starts a new list)
    patches: tuple[FinePatch, ...] = ()


@dataclass(eq=False)
class _BoxRegion:
    box: Box
    mask: torch.Tensor  # [1, 1, D, H, W] bool on the working grid (inside box and fixed image)
    voxels: int
    inside_fraction: float
    warnings: list[str] = field(default_factory=list)


class DeepRegistrationSession:
    """Deep deformable registration of ``moving`` onto ``fixed`` that a user refines step by step."""

    def __init__(self, fixed: Volume, moving: Volume, *, weights=None, device: str = "auto",
                 similarity: str = "auto", seed: int = 0, working_spacing_mm: float | None = None,
                 smoothness_weight: float | None = None, learning_rate: float = 3e-4,
                 fixed_mask: Volume | None = None, rso_spacing_mm: float | None = None,
                 fine_smoothness_weight: float | None = None, fine_similarity: str | None = None):
        validate_registration_input(fixed, "fixed", method="deep")
        validate_registration_input(moving, "moving", method="deep")
        if working_spacing_mm is not None and not (math.isfinite(working_spacing_mm) and working_spacing_mm > 0):
            raise InvalidParameterError(f"working spacing must be a positive number of mm, got {working_spacing_mm!r}")
        if not (learning_rate > 0):
            raise InvalidParameterError(f"learning rate must be positive, got {learning_rate!r}")
        self.fixed, self.moving = fixed, moving
        self.device = resolve_device(device)
        self.seed = int(seed)
        seed_everything(self.seed)
        self.weights_source = weights if isinstance(weights, (str, Path)) or weights is None else "state_dict"
        self.model = load_general_model(weights, self.device)
        self._initial_weights = _clone_weights(self.model)
        self.fixed_modality, self.moving_modality = guess_modality(fixed), guess_modality(moving)
        if similarity == "auto":
            similarity = "mse" if self.fixed_modality == self.moving_modality else "ncc"
        self.similarity = Similarity(similarity)
        self.smoothness_weight = DEFAULT_SMOOTHNESS[similarity] if smoothness_weight is None else float(smoothness_weight)
        #: similarity and regulariser weight of RSO steps on a finer local grid (see DEFAULT_FINE_SIMILARITY)
        fine_kind = DEFAULT_FINE_SIMILARITY.get(similarity, similarity) if fine_similarity is None else fine_similarity
        if fine_kind == "disa" and similarity != "disa":
            raise InvalidParameterError("fine RSO steps can use DISA descriptors only in a session registering "
                                        "with similarity 'disa' (its descriptor maps are made at the start)")
        self.fine_similarity = self.similarity if fine_kind == similarity else Similarity(fine_kind)
        if fine_smoothness_weight is not None:
            self.fine_smoothness_weight = float(fine_smoothness_weight)
        else:  # its own default, not ``smoothness_weight``: finer grids measured better with stronger ones
            self.fine_smoothness_weight = DEFAULT_FINE_SMOOTHNESS.get(fine_kind, DEFAULT_SMOOTHNESS[fine_kind])
        self.learning_rate = float(learning_rate)
        self.working_spacing_mm = choose_spacing(fixed.geometry, working_spacing_mm, self.model.trained_spacing_mm)
        self.grid: ImageGeometry = working_geometry(fixed.geometry, self.working_spacing_mm)
        #: spacing of cropped RSO steps; finer than the working grid = a local residual refinement;
        #: None = chosen per box (:meth:`_auto_rso_spacing`)
        self.rso_spacing_mm = None if rso_spacing_mm is None else self._check_rso_spacing(rso_spacing_mm)
        # the normalised images, kept to resample onto the local grids of fine RSO steps
        self._fixed_norm = normalise(fixed, self.fixed_modality)
        self._moving_norm = normalise(moving, self.moving_modality)
        with torch.no_grad():
            f = to_working(self._fixed_norm, self.grid)
            m = to_working(self._moving_norm, self.grid)
        self._fixed_w = f[None, None].to(self.device)
        self._moving_w = m[None, None].to(self.device)
        self._pair = torch.cat([self._fixed_w, self._moving_w], dim=1)
        # what the similarity compares: the images themselves, or their DISA descriptor maps
        self._fixed_sim, self._moving_sim = self._fixed_w, self._moving_w
        if similarity == "disa":
            self._fixed_sim, self._moving_sim = disa_targets(fixed, moving, self.grid, self.device)
        self._inside = _inside_mask(self.grid, fixed.geometry).to(self.device)[None, None]
        self._masked = fixed_mask is not None
        if fixed_mask is not None:  # the losses (ISO's whole image, RSO's box) count only inside it
            self._inside = self._inside & _mask_on_grid(fixed_mask, self.grid).to(self.device)[None, None]
        self._points = self.grid.physical_grid(dtype=torch.float64)  # [D, H, W, 3] (cpu)
        self._done: list[_State] = []
        self._undone: list[_State] = []
        self._loaded_history: list[RegistrationStep] = []

    # ------------------------------------------------------------------ state
    @property
    def can_undo(self) -> bool:
        return bool(self._done)

    @property
    def can_redo(self) -> bool:
        return bool(self._undone)

    @property
    def history(self) -> list[RegistrationStep]:
        """The steps that made the current state, oldest first."""
        return list(self._loaded_history) + [s.step for s in self._done]

    def undo(self) -> bool:
        if not self._done:
            return False
        self._undone.append(self._done.pop())
        self._load_weights(self._done[-1].weights if self._done else self._initial_weights)
        return True

    def redo(self) -> bool:
        if not self._undone:
            return False
        self._done.append(self._undone.pop())
        self._load_weights(self._done[-1].weights)
        return True

    def current(self) -> RegistrationResult | None:
        """The current registration (fixed → moving displacement on the fixed grid), or None."""
        if not self._done:
            return None
        state = self._done[-1]
        return self._result_of(state)

    @property
    def current_field(self) -> torch.Tensor | None:
        """The current displacement on the working grid, [1, 3, D, H, W] in working voxels (a copy;
        fine RSO patches included, interpolated onto the working grid)."""
        return None if not self._done else self._effective_field(self._done[-1]).detach().clone()

    # ------------------------------------------------------------------ steps
    def general(self, progress: ProgressCallback | None = None, cancel: CancelToken | None = None) -> RegistrationResult:
        """The general model's prediction (a forward pass with the shipped / given weights)."""
        return self._on_cpu_if_gpu_runs_out(lambda: self._general(progress, cancel), "the general model")

    def _general(self, progress, cancel) -> RegistrationResult:
        scope = ProgressScope(progress, cancel=cancel)
        scope(0.0, "general model")
        started = time.perf_counter()
        self._load_weights(self._initial_weights)
        with torch.no_grad():
            new_field = self.model(self._pair)
            loss = float(self._similarity_of(new_field, self._inside))
            before = float(self._similarity_of(torch.zeros_like(new_field), self._inside))
        seconds = time.perf_counter() - started
        step = RegistrationStep("general", seconds=seconds, iterations=0, figures={
            "kind": "general", "loss_before": before, "loss_after": loss, "loss_curve": [],
            **self._common_figures()})
        self._push(_State(_clone_weights(self.model), new_field.detach(), step))
        scope(1.0, "general model done")
        return self.current()

    def iso(self, iterations: int = 100, progress: ProgressCallback | None = None,
            cancel: CancelToken | None = None) -> RegistrationResult:
        """Image-specific optimisation: fine-tune all weights on this pair, whole-image loss."""
        iterations = _check_iterations(iterations)

        def run():
            with self._restoring():
                scope = self._scope_after_general(progress, cancel)
                return self._optimise("iso", iterations, self._inside, None, None, scope)
        return self._on_cpu_if_gpu_runs_out(run, "ISO")

    def rso(self, box: Box, iterations: int = 400, crop: bool = True, progress: ProgressCallback | None = None,
            cancel: CancelToken | None = None, spacing_mm: float | None = None,
            smoothness_weight: float | None = None) -> RegistrationResult:
        """Region-specific optimisation: fine-tune all weights with the similarity inside ``box`` only.

        ``spacing_mm`` (cropped steps only; default the session's ``rso_spacing_mm``, or else the
        finest spacing whose local grid stays within MAX_FINE_VOXELS, no finer than the fixed image
        or a quarter of the working spacing): below the working spacing, the step refines the
        current registration on a local grid of that spacing.  ``smoothness_weight`` overrides the
        session's for this step (e.g. a stronger one for a fine step; see docs/benchmarks.md)."""
        iterations = _check_iterations(iterations)
        requested = spacing_mm if spacing_mm is not None else self.rso_spacing_mm
        if requested is not None:
            self._check_rso_spacing(requested)
        region = self.box_region(box)  # refuses bad boxes before any work
        for message in region.warnings:
            warnings.warn(message, stacklevel=2)

        def run():
            with self._restoring():
                scope = self._scope_after_general(progress, cancel)
                # the mask is rebuilt here so that it lives on the device the step runs on
                step_region = self.box_region(box)
                spacing = float(requested) if requested is not None else self._auto_rso_spacing(step_region)
                if crop and spacing < self.working_spacing_mm - 1e-6:
                    return self._optimise_fine(iterations, step_region, spacing, scope, smoothness_weight)
                block = self._crop_for(step_region) if crop else None
                return self._optimise("rso", iterations, step_region.mask, step_region, block, scope)
        return self._on_cpu_if_gpu_runs_out(run, "RSO")

    def _scope_after_general(self, progress, cancel) -> ProgressScope:
        """The progress scope of a refinement step, after running the general model first when the
        session has no registration yet (refinement without a prior registration starts from it)."""
        scope = ProgressScope(progress, cancel=cancel)
        if not self._done:
            self._general(scope.sub(0.0, 0.05), None)
            scope = scope.sub(0.05, 1.0)
        return scope

    def box_region(self, box: Box) -> _BoxRegion:
        """The working-grid voxels of ``box`` inside the fixed image; refuses boxes RSO cannot use."""
        if not isinstance(box, Box):
            raise InvalidParameterError(f"rso needs a Box (centre and size in fixed-image LPS mm), got {type(box).__name__}")
        fraction = _fraction_inside(box, self.fixed.geometry)
        if fraction <= 0.0:
            raise InvalidParameterError(
                f"the box (centre {tuple(round(c, 1) for c in box.center)} mm, size "
                f"{tuple(round(s, 1) for s in box.size)} mm) lies outside the fixed image; draw it on the image")
        mask = box.mask(self.grid).to(self._inside.device)[None, None] & self._inside
        voxels = int(mask.sum())
        if voxels < MIN_BOX_VOXELS:
            raise InvalidParameterError(
                f"the box covers only {voxels} voxel(s) of the {self.working_spacing_mm:g} mm working grid inside the "
                f"fixed image{' and its mask' if self._masked else ''}; RSO needs at least {MIN_BOX_VOXELS}: draw it "
                f"{'inside the mask and ' if self._masked else ''}at least {2 * self.working_spacing_mm:g} mm wide "
                "along every axis")
        messages = []
        if fraction < 0.999:
            messages.append(f"the box extends outside the fixed image; it was clipped to the {100 * fraction:.0f}% "
                            "inside it")
        return _BoxRegion(box, mask, voxels, fraction, messages)

    def in_box_loss(self, box: Box) -> float | None:
        """The similarity loss of the current field inside ``box`` (None before any registration)."""
        if not self._done:
            return None
        region = self.box_region(box)
        with torch.no_grad():
            return float(self._similarity_of(self._effective_field(self._done[-1]), region.mask))

    # ------------------------------------------------------------------ optimisation
    def _optimise(self, kind: str, iterations: int, mask: torch.Tensor, region: _BoxRegion | None,
                  block: Crop | None, scope: ProgressScope) -> RegistrationResult:
        previous = self._done[-1]
        started = time.perf_counter()
        with torch.no_grad():
            before = float(self._similarity_of(previous.field, mask))
            whole_before = float(self._similarity_of(previous.field, self._inside))
        self._load_weights(previous.weights)  # warm start from the current state
        self.model.train()
        optimiser = make_adam(self.model, self.learning_rate)
        if block is not None:
            sl = (slice(None), slice(None)) + block.slices
            pair, fixed_block, mask_block, offset = self._pair[sl], self._fixed_sim[sl], mask[sl], block.start
        else:
            pair, fixed_block, mask_block, offset = self._pair, self._fixed_sim, mask, (0, 0, 0)
        curve: list[float] = []
        label = "ISO" if kind == "iso" else "RSO"
        try:
            scope(0.0, f"{label} 0/{iterations}")
            for i in range(iterations):
                optimiser.zero_grad(set_to_none=True)
                out = self.model(pair)
                warped = warp_on_grid(self._moving_sim, out, offset)
                similarity = self.similarity(warped, fixed_block, mask_block)
                loss = similarity + self.smoothness_weight * smoothness(out)
                loss.backward()
                optimiser.step()
                curve.append(float(similarity.detach()))
                scope((i + 1) / (iterations + 1), f"{label} {i + 1}/{iterations}  loss {curve[-1]:.4g}")
            with torch.no_grad():
                out = self.model(pair)
                new_field = self._compose(previous.field, out, region, block)
                after = float(self._similarity_of(new_field, mask))
                whole_after = float(self._similarity_of(new_field, self._inside))
            if scope.cancel is not None:
                scope.cancel.raise_if_cancelled()
        except BaseException:
            self._load_weights(previous.weights)  # the exact state before this call
            raise
        finally:
            self.model.eval()
        seconds = time.perf_counter() - started
        figures: dict[str, Any] = {
            "kind": kind, "loss_curve": curve, "loss_before": whole_before, "loss_after": whole_after,
            "seconds_per_iteration": seconds / max(1, iterations), **self._common_figures()}
        if region is not None:
            figures.update({
                "in_box_loss_before": before, "in_box_loss_after": after,
                "box": {"center": list(region.box.center), "size": list(region.box.size), "axes": list(region.box.axes)},
                "box_voxels_working": region.voxels, "box_inside_fraction": region.inside_fraction,
                "crop": list(block.shape) if block is not None else None, "warnings": list(region.warnings)})
        step = RegistrationStep(kind, seconds=seconds, iterations=iterations, figures=figures)
        patches = previous.patches if region is not None else ()  # ISO's output replaces everything
        self._push(_State(_clone_weights(self.model), new_field.detach(), step, patches=patches))
        scope(1.0, f"{label} done")
        return self.current()

    def _optimise_fine(self, iterations: int, region: _BoxRegion, spacing: float, scope: ProgressScope,
                       smoothness_weight: float | None = None) -> RegistrationResult:
        """RSO on a local grid of ``spacing`` mm around the box: the network sees (fixed, moving warped by
        the current registration) and learns a residual; see :mod:`.fine_patch`."""
        previous = self._done[-1]
        started = time.perf_counter()
        weight = self.fine_smoothness_weight if smoothness_weight is None else float(smoothness_weight)
        current = self._result_of(previous).transform
        grid = local_grid(region.box, spacing, self._crop_margin_mm(region), self.grid.direction)
        dev = self._inside.device
        fixed_local = resample_onto(self._fixed_norm.data[None], self.fixed.geometry, grid).to(dev)
        moving_local = resample_onto(self._moving_norm.data[None], self.moving.geometry, grid, current).to(dev)
        similarity_of = self.fine_similarity
        if similarity_of.kind == "disa":  # the descriptor maps, brought onto the local grid the same way
            fixed_sim = resample_onto(self._fixed_sim[0], self.grid, grid).to(dev)
            moving_sim = resample_onto(self._moving_sim[0], self.grid, grid, current).to(dev)
        else:
            fixed_sim, moving_sim = fixed_local, moving_local
        counted = resample_onto(self._inside[0].float(), self.grid, grid, interpolation="nearest")[0, 0] > 0
        mask = (region.box.mask(grid) & counted).to(dev)[None, None]
        if int(mask.sum()) < MIN_BOX_VOXELS:
            raise InvalidParameterError(f"the box covers fewer than {MIN_BOX_VOXELS} voxels of the {spacing:g} mm "
                                        "refinement grid inside the fixed image; draw it larger")
        pair = torch.cat([fixed_local, moving_local], dim=1)
        self._load_weights(previous.weights)
        self.model.train()
        optimiser = make_adam(self.model, self.learning_rate)
        curve: list[float] = []
        try:
            with torch.no_grad():
                start = self.model(pair)  # the residual is measured from here: the step starts where we are
                before = float(similarity_of(moving_sim, fixed_sim, mask))
            scope(0.0, f"RSO 0/{iterations} at {spacing:g} mm")
            for i in range(iterations):
                optimiser.zero_grad(set_to_none=True)
                residual = self.model(pair) - start
                similarity = similarity_of(warp_on_grid(moving_sim, residual), fixed_sim, mask)
                loss = similarity + weight * smoothness(residual)
                loss.backward()
                optimiser.step()
                curve.append(float(similarity.detach()))
                scope((i + 1) / (iterations + 1), f"RSO {i + 1}/{iterations} at {spacing:g} mm  loss {curve[-1]:.4g}")
            with torch.no_grad():
                residual = self.model(pair) - start
                after = float(similarity_of(warp_on_grid(moving_sim, residual), fixed_sim, mask))
            if scope.cancel is not None:
                scope.cancel.raise_if_cancelled()
        except BaseException:
            self._load_weights(previous.weights)
            raise
        finally:
            self.model.eval()
        change = change_of_displacement(residual, current, grid)
        patch = FinePatch(grid, change, region.box, self._transition_mm(region.box))
        seconds = time.perf_counter() - started
        figures: dict[str, Any] = {
            "kind": "rso", "loss_curve": curve, "seconds_per_iteration": seconds / max(1, iterations),
            "local_grid_loss_before": before, "local_grid_loss_after": after, "refine_spacing_mm": spacing,
            "box": {"center": list(region.box.center), "size": list(region.box.size), "axes": list(region.box.axes)},
            "box_voxels_working": region.voxels, "box_inside_fraction": region.inside_fraction,
            "crop": list(grid.shape), "warnings": list(region.warnings), **self._common_figures(),
            "smoothness_weight": weight, "fine_similarity": similarity_of.kind}
        state = _State(_clone_weights(self.model), previous.field, None, patches=previous.patches + (patch,))  # type: ignore[arg-type]
        with torch.no_grad():
            figures["in_box_loss_before"] = float(self._similarity_of(self._effective_field(previous), region.mask))
            figures["in_box_loss_after"] = float(self._similarity_of(self._effective_field(state), region.mask))
        state.step = RegistrationStep("rso", seconds=seconds, iterations=iterations, figures=figures)
        self._push(state)
        scope(1.0, "RSO done")
        return self.current()

    def _compose(self, old: torch.Tensor, out: torch.Tensor, region: _BoxRegion | None, block: Crop | None) -> torch.Tensor:
        """The field after a step: the network's whole output (ISO), or for RSO the old field with the
        new output blended in over the box and a transition band around it."""
        if region is None:
            return out
        weight = self._blend_weight(region.box).to(out.device, out.dtype)
        if block is None:
            return old + weight * (out - old)
        new = old.clone()
        sl = (slice(None), slice(None)) + block.slices
        new[sl] = old[sl] + weight[sl] * (out - old[sl])
        return new

    def _transition_mm(self, box: Box) -> float:
        return max(2.0 * self.working_spacing_mm, 0.25 * min(box.size))

    def _blend_weight(self, box: Box) -> torch.Tensor:
        """1 inside the box, falling linearly to 0 at ``transition`` mm from it: [1, 1, D, H, W]."""
        return box.falloff(self._points, self._transition_mm(box)).float()[None, None]

    def _crop_margin_mm(self, region: _BoxRegion) -> float:
        """How far the network's view must reach beyond the box: the largest current displacement in
        it + the blend band + context."""
        field_now = self._done[-1].field if self._done else None
        largest = 0.0
        if field_now is not None:
            lengths = torch.linalg.norm(field_now, dim=1, keepdim=True) * self.working_spacing_mm
            largest = float(lengths[region.mask].max()) if bool(region.mask.any()) else 0.0
        return largest + self._transition_mm(region.box) + CROP_CONTEXT_MM

    def _crop_for(self, region: _BoxRegion) -> Crop:
        """The block of the working grid the network sees for a cropped RSO: box + margin
        (:meth:`_crop_margin_mm`), rounded to multiples of 16."""
        bounds = region.box.index_bounds(self.grid, self._crop_margin_mm(region))
        if bounds is None:  # cannot happen for a validated box; fall back to the whole grid
            return Crop((0, 0, 0), self.grid.shape)
        return crop_around(bounds, self.grid.shape)

    def _similarity_of(self, field_voxels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        warped = warp_on_grid(self._moving_sim, field_voxels)
        return self.similarity(warped, self._fixed_sim, mask)

    # ------------------------------------------------------------------ helpers
    def _on_cpu_if_gpu_runs_out(self, step, what: str):
        """Run ``step``; if the GPU runs out of memory, move the whole session (network, images,
        every kept state) to the CPU with a warning and run it once more there.  The failed attempt
        changed nothing: each step restores the state from before it on any exception."""
        try:
            return step()
        except torch.cuda.OutOfMemoryError:
            if self.device.type == "cpu":
                raise
            warnings.warn(f"GPU out of memory during {what} on the {self.working_spacing_mm:g} mm working grid "
                          f"{self.grid.shape}; the session continues on the CPU (slower)", RuntimeWarning, stacklevel=3)
            self._move_to(torch.device("cpu"))
            return step()

    def _move_to(self, device: torch.device) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.device = device
        self.model.to(device)
        self._fixed_w, self._moving_w = self._fixed_w.to(device), self._moving_w.to(device)
        self._pair, self._inside = self._pair.to(device), self._inside.to(device)
        self._fixed_sim, self._moving_sim = self._fixed_sim.to(device), self._moving_sim.to(device)
        for state in self._done + self._undone:
            state.field = state.field.to(device)
            state.weights = {k: v.to(device) for k, v in state.weights.items()}
        self._initial_weights = {k: v.to(device) for k, v in self._initial_weights.items()}

    def _common_figures(self) -> dict:
        return {"similarity": self.similarity.kind, "smoothness_weight": self.smoothness_weight,
                "working_spacing_mm": self.working_spacing_mm, "working_grid": list(self.grid.shape),
                "device": describe_device(self.device)}

    @contextlib.contextmanager
    def _restoring(self):
        """On any exception (a cancel included), put back the steps, redo list and weights as they were."""
        done, undone = list(self._done), list(self._undone)
        try:
            yield
        except BaseException:
            self._done, self._undone = done, undone
            self._load_weights(done[-1].weights if done else self._initial_weights)
            raise

    def _push(self, state: _State) -> None:
        self._done.append(state)
        self._undone.clear()

    def _load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(weights)

    def _effective_field(self, state: _State) -> torch.Tensor:
        """The state's displacement on the working grid (voxels) with its fine patches added: what the
        working-grid losses of :meth:`in_box_loss` and the step figures measure."""
        if not state.patches:
            return state.field
        mm = voxels_to_mm(state.field.detach().double().cpu(), self.grid)[0].permute(1, 2, 3, 0)
        for patch in state.patches:
            mm = mm + patch.weighted_change(self._points)
        return mm_to_voxels(mm.permute(3, 0, 1, 2)[None], self.grid).to(state.field)

    def _result_of(self, state: _State) -> RegistrationResult:
        if state.result is None:
            state.result = self._make_result(state)
        return state.result

    def _auto_rso_spacing(self, region: _BoxRegion) -> float:
        spacing = max(min(self.fixed.geometry.spacing), FINEST_FRACTION_OF_WORKING * self.working_spacing_mm)
        margin = self._crop_margin_mm(region)
        while spacing < self.working_spacing_mm and local_grid(
                region.box, spacing, margin, self.grid.direction).voxel_count() > MAX_FINE_VOXELS:
            spacing *= 1.1
        return min(spacing, self.working_spacing_mm)

    def _check_rso_spacing(self, spacing_mm: float) -> float:
        if not (isinstance(spacing_mm, (int, float)) and math.isfinite(spacing_mm) and spacing_mm > 0):
            raise InvalidParameterError(f"the RSO spacing must be a positive number of mm, got {spacing_mm!r}")
        if spacing_mm > self.working_spacing_mm + 1e-6:
            raise InvalidParameterError(f"the RSO spacing ({spacing_mm:g} mm) cannot be coarser than the working grid "
                                        f"({self.working_spacing_mm:g} mm)")
        return float(spacing_mm)

    def _make_result(self, state: _State) -> RegistrationResult:
        transform = field_to_fixed(state.field.cpu(), self.grid, self.fixed.geometry)
        for patch in state.patches:
            transform = patch.blend_into(transform)
        warped = warp_volume(self.moving.float(), transform, self.fixed.geometry)
        figures = dict(state.step.figures)
        history = list(self._loaded_history) + [s.step for s in self._done[: self._done.index(state) + 1]]
        figures["steps"] = [s.name for s in history]
        return RegistrationResult(method="deep" if state.step.name == "general" else f"deep+{state.step.name}",
                                  transform=transform, warped=warped, fixed=self.fixed, moving=self.moving,
                                  figures=figures, history=history, device=str(self.device),
                                  seconds=state.step.seconds)

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | Path) -> Path:
        """Write the current state (weights, working-grid field, settings, history) into ``folder``."""
        if not self._done:
            raise InvalidParameterError("nothing to save: run general(), iso() or rso() first")
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        state = self._done[-1]
        with atomic_output(out / SESSION_FILE) as tmp:
            # ``inside`` carries a fixed mask given at registration on to later refinements
            torch.save({"weights": {k: v.cpu() for k, v in state.weights.items()}, "field": state.field.cpu(),
                        "inside": self._inside.cpu(), "patches": [p.to_dict() for p in state.patches]}, tmp)
        meta = {
            "format": 1, "weights_source": None if self.weights_source in (None, "state_dict") else str(self.weights_source),
            "similarity": self.similarity.kind, "smoothness_weight": self.smoothness_weight,
            "learning_rate": self.learning_rate, "seed": self.seed, "working_spacing_mm": self.working_spacing_mm,
            "rso_spacing_mm": self.rso_spacing_mm, "fine_smoothness_weight": self.fine_smoothness_weight,
            "fine_similarity": self.fine_similarity.kind,
            "fixed_geometry": _geometry_dict(self.fixed.geometry), "moving_geometry": _geometry_dict(self.moving.geometry),
            "history": [{"name": s.name, "seconds": s.seconds, "iterations": s.iterations, "figures": s.figures}
                        for s in self.history]}
        with atomic_output(out / SESSION_JSON) as tmp:
            tmp.write_text(json.dumps(meta, indent=1))
        return out / SESSION_FILE

    @classmethod
    def load(cls, folder: str | Path, fixed: Volume, moving: Volume, *, device: str = "auto",
             **overrides) -> "DeepRegistrationSession":
        """A session continuing from the state saved in ``folder`` by :meth:`save` (e.g. by
        ``deepmmreg register --method deep``) for the same fixed and moving images."""
        from ..errors import TransformFileError

        folder = Path(folder)
        meta_path, state_path = folder / SESSION_JSON, folder / SESSION_FILE
        if not meta_path.is_file() or not state_path.is_file():
            raise TransformFileError(f"{folder} holds no deep registration session ({SESSION_JSON}, {SESSION_FILE}); "
                                     "make one with `deepmmreg register --method deep`")
        meta = json.loads(meta_path.read_text())
        for role, volume in (("fixed", fixed), ("moving", moving)):
            saved = ImageGeometry(**{k: tuple(v) for k, v in meta[f"{role}_geometry"].items()})
            if not saved.same_grid(volume.geometry):
                raise InvalidParameterError(f"the {role} image is not the one the session in {folder} was made with "
                                            "(its grid differs); pass the same fixed and moving images")
        settings = dict(weights=meta["weights_source"], similarity=meta["similarity"], seed=meta["seed"],
                        working_spacing_mm=meta["working_spacing_mm"], smoothness_weight=meta["smoothness_weight"],
                        learning_rate=meta["learning_rate"], rso_spacing_mm=meta.get("rso_spacing_mm"),
                        fine_smoothness_weight=meta.get("fine_smoothness_weight"),
                        # sessions saved before fine steps had their own similarity refined with the session's
                        fine_similarity=meta.get("fine_similarity", meta["similarity"]))
        if overrides.get("fine_similarity") not in (None, settings["fine_similarity"]):
            settings["fine_smoothness_weight"] = None  # the saved weight was for the other similarity's scale
        settings.update(overrides)
        session = cls(fixed, moving, device=device, **settings)
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        if tuple(saved["field"].shape[2:]) != session.grid.shape:
            raise InvalidParameterError("the saved session's working grid does not match; it cannot be continued")
        weights = {k: v.to(session.device) for k, v in saved["weights"].items()}
        records = [RegistrationStep(r["name"], r["seconds"], r["iterations"], r["figures"]) for r in meta["history"]]
        session._loaded_history = records[:-1]  # earlier steps: records only (undo cannot go back into them)
        patches = tuple(FinePatch.from_dict(p) for p in saved.get("patches", []))
        session._push(_State(weights, saved["field"].to(session.device), records[-1], patches=patches))
        session._load_weights(weights)
        if "inside" in saved and "fixed_mask" not in overrides:
            session._inside = saved["inside"].to(session.device)
            session._masked = not bool(session._inside.equal(_inside_mask(session.grid, fixed.geometry)[None, None]))
        return session

    def __repr__(self) -> str:
        return (f"DeepRegistrationSession(fixed={self.fixed.name!r}, moving={self.moving.name!r}, "
                f"grid={self.grid.shape} @ {self.working_spacing_mm:g} mm, steps={[s.name for s in self.history]})")


# ---------------------------------------------------------------------------------- helpers
def make_adam(model: torch.nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    """Adam (the paper's optimiser), fused where torch supports it.

    Also flushes denormal floats to zero (process-wide; values below 1e-38 only): Adam's tiny
    second-moment values otherwise make each CPU step tens of times slower."""
    torch.set_flush_denormal(True)
    try:
        return torch.optim.Adam(model.parameters(), lr=learning_rate, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=learning_rate)


def _clone_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check_iterations(iterations) -> int:
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 1:
        raise InvalidParameterError(f"iterations must be a positive whole number, got {iterations!r}")
    return int(iterations)


def _geometry_dict(g: ImageGeometry) -> dict:
    return {"shape": list(g.shape), "spacing": list(g.spacing), "origin": list(g.origin), "direction": list(g.direction)}


def _inside_mask(grid: ImageGeometry, fixed: ImageGeometry) -> torch.Tensor:
    """Working voxels whose centre lies inside the fixed image's box (ITK's [-0.5, size - 0.5))."""
    points = grid.physical_grid(dtype=torch.float64)
    m = torch.as_tensor(fixed.physical_to_index_matrix(), dtype=torch.float64)
    index = points @ m[:3, :3].T + m[:3, 3]
    size = torch.as_tensor(fixed.size_xyz, dtype=torch.float64)
    return ((index >= -0.5) & (index < size - 0.5)).all(dim=-1)


def _mask_on_grid(mask: Volume, grid: ImageGeometry) -> torch.Tensor:
    """A user mask (non-zero = inside) on the working grid, nearest neighbour; refused when empty there."""
    from ..errors import InvalidImageError
    from ..transforms.linear import AffineTransform
    from ..transforms.resample import resample_tensor

    if not isinstance(mask, Volume):
        raise InvalidParameterError("the fixed mask must be a volume with its geometry")
    identity = AffineTransform.identity(dtype=torch.float64)
    on_grid = resample_tensor((mask.data != 0).float()[None], mask.geometry, identity, grid,
                              interpolation="nearest")[0, 0] > 0
    if not bool(on_grid.any()):
        raise InvalidImageError(f"the fixed mask {mask.name or ''} has no voxel inside the fixed image on the "
                                f"{grid.spacing[0]:g} mm working grid; check that it belongs to this image")
    return on_grid


def _fraction_inside(box: Box, fixed: ImageGeometry, n: int = 12) -> float:
    """Fraction of the box's volume inside the fixed image's box (sampled on n³ points)."""
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n - 0.5
    local = torch.stack(torch.meshgrid(t, t, t, indexing="ij"), dim=-1).reshape(-1, 3) * torch.as_tensor(box.size)
    points = local @ torch.as_tensor(box.axes_matrix).T + torch.as_tensor(box.center)
    m = torch.as_tensor(fixed.physical_to_index_matrix(), dtype=torch.float64)
    index = points @ m[:3, :3].T + m[:3, 3]
    size = torch.as_tensor(fixed.size_xyz, dtype=torch.float64)
    return float(((index >= -0.5) & (index < size - 0.5)).all(dim=-1).double().mean())
