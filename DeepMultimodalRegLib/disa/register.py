"""The feature-based registration methods: disa-* and mind-* (rigid, affine, deformable).

One code path for both feature kinds, so DISA and MIND-SSC are compared on identical engines:

1. features of fixed and moving, computed once (:mod:`.features`);
2. a rigid pose by local or global search (:mod:`.search`);
3. ``affine``: a local affine refinement from the rigid pose;
4. ``deformable``: the affine pose, then either the dense discrete stage (``deformable="dense"``,
   the paper's section 4.2, the default) or a coarse B-spline optimised jointly with the pose
   (``deformable="bspline"``).

Options in ``RegistrationOptions.extra``: ``starts``, ``range_deg``, ``range_mm`` (global search),
``coarse_x_tolerance_mm``/``coarse_f_tolerance`` (when a start stops on the coarse level, :class:`.SearchSettings`),
``initial`` (a linear transform to start from instead of aligned image centres), ``deformable``
("dense" | "bspline"), ``control_spacing_mm``, ``model`` (a DISA network already loaded),
``fixed_modality``/``moving_modality`` ("CT" | "MR", guessed otherwise), ``disa_sign_symmetric``
(default True: DISA descriptors averaged over each image and its negative; False: the raw network),
``disa_precision`` (the network passes' arithmetic: "auto", the default, bfloat16 on a CPU that computes it
natively and float32 elsewhere; "float32"; "bfloat16"; the result's figures say which ran),
``disa_comparison`` (the rigid stages': "cosine", the default, centred descriptors scaled to unit
length, so the similarity is their cosine, :func:`.features.unit_length_pair`; "dot": the centred dot
product, which the affine stage always uses),
``refine`` (disa-* only; "disa", the default: a local rigid search on DISA descriptors of the
moving image resampled at the found pose, see :func:`_resampled_polish`, and with a global search
the starts spread over a bank of turned copies of the fixed image, :mod:`.orientation_bank`;
"mind": after the DISA rigid search, a local rigid search on MIND-SSC features from its pose, and
MIND-SSC for the later stages too; "none": the DISA search's pose as it is), ``affine_weighting``
(the weights of the affine stage: "support", the default on DISA features, equal weights wherever the
fixed image has structure, :func:`.features.support_weights`; "variance", the default on MIND-SSC
features, LC²'s local-variance weights as in the rigid stage), ``dense_descriptor_stride`` (DISA's
dense deformable stage: 2, the default, descriptors every 4 mm from the network run à trous; 4, the
8 mm map the linear stages use), ``dense_disa_comparison`` (how that stage compares them: "cosine", the
default, unit descriptors with equal weights on every structured location, :func:`.features.cosine_pair`;
"dot", as the linear stages compare them).

Why ``refine="mind"``: the earlier DISA weights (until 2026-11-22) found the right basin from far
away (global search) but their optimum lay up to ~2–3 mm from the true pose on some contrast
pairs (Kirby21 T2: 2.2 mm; docs/benchmarks.md), while MIND-SSC on this engine sits within ~0.5 mm
but is slower to search globally.  DISA's search then MIND-SSC's local polish gives both.  The result is no
longer DISA alone, and its report says so (``figures["refine"]``).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import fields, replace

import numpy as np
import torch

from ..device import describe_device, native_bfloat16, resolve_device
from ..errors import InvalidParameterError
from ..image.validation import validate_registration_input
from ..image.volume import Volume
from ..networks.disa_net import OUTPUT_STRIDES, PRECISIONS, load_disa_network
from ..methods.registry import RegistrationOptions
from ..progress import ProgressScope
from ..result import RegistrationResult, RegistrationStep
from ..transforms.composite import CompositeTransform
from ..transforms.linear import LinearTransform, RigidTransform
from ..transforms.resample import warp_volume
from .features import FeaturePair, cosine_pair, feature_pair, support_weights, unit_length_pair
from .objective import FeatureObjective
from .parametrization import (AffineParametrization, PoseWithBSpline, RigidParametrization, coordinates_of,
                              nearest_rotation_pose)
from .preprocess import DISA_SPACING_MM, smooth_for_disa
from .search import SearchSettings, search_pose

_EXTRA_KEYS = {"starts", "range_deg", "range_mm", "initial", "deformable", "control_spacing_mm", "model",
               "fixed_modality", "moving_modality", "coarse_points", "fine_points", "coarse_iterations",
               "fine_iterations", "keep", "memory_budget_bytes", "dense", "disa_sign_symmetric", "refine",
               "coarse_x_tolerance_mm", "coarse_f_tolerance", "affine_weighting", "dense_descriptor_stride",
               "dense_disa_comparison", "disa_comparison", "disa_precision"}
#: what ``extra["refine"]`` may name: the features of a local rigid polish after the DISA search
#: ("disa": DISA again, on the moving image resampled at the found pose, see :func:`_resampled_polish`;
#: "none": the DISA search's pose as it is)
REFINEMENTS = ("disa", "mind", "none")
#: disa-* polish by default: on every measured case it ended nearer the truth than the plain search
#: (Kirby21 T2/FLAIR 0.5–0.6 mm against 1–7 mm with the images turned; docs/benchmarks.md)
DEFAULT_REFINE = "disa"
#: what ``extra["affine_weighting"]`` may name, and each kind's default.  DISA's affine stage uses equal
#: weights: with LC²'s variance weights the head's rim set the scale and the 5%-scaling test case ended
#: 2.2 mm (T2) / 1.6 mm (FLAIR) off, with equal weights 1.26 / 1.04 mm; MIND-SSC is as good either
#: way (0.54 / 0.43 mm with variance weights, 0.61 / 0.52 mm equal) and keeps the rigid stage's weights
#: (benchmarks/disa_affine_scaling.py)
AFFINE_WEIGHTINGS = ("support", "variance")
#: keyed by the features the affine stage runs on (after refine="mind", a disa-* run's are MIND-SSC's)
DEFAULT_AFFINE_WEIGHTING = {"dot": "support", "ssd": "variance"}
#: output stride of the DISA descriptors the dense deformable stage compares.  Why 2: on the 8 mm map a
#: known smooth brain deformation shrank by 12–19% only, each descriptor seeing 98 mm and the cost
#: volume barely changing over the ±12 mm search; the same network run à trous (4 mm) recovers about
#: twice as much (docs/benchmarks.md, "the issue's deformable test case on the brain")
DENSE_DESCRIPTOR_STRIDES = OUTPUT_STRIDES
DEFAULT_DENSE_DESCRIPTOR_STRIDE = 2
#: how DISA descriptors are compared ("cosine" or "dot"): by the rigid stages (``extra["disa_comparison"]``,
#: :func:`.features.unit_length_pair`) and by the dense stage (``extra["dense_disa_comparison"]``,
#: :func:`.features.cosine_pair`: also equal weights); the affine stage always uses the dot product.
#: Cosine by default: on the brain test deformations 2.15 / 2.04 mm → 1.73 / 1.62 mm (dense stage);
#: chest-CT capture range 5 → 7 of 8 under 2 mm (rigid stages)
DISA_COMPARISONS = ("cosine", "dot")
DEFAULT_DISA_COMPARISON = DEFAULT_DENSE_DISA_COMPARISON = "cosine"
#: what ``extra["disa_precision"]`` may name: the arithmetic of every DISA network pass of a run.  "auto",
#: the default: bfloat16 where the CPU computes it natively (:func:`~..device.native_bfloat16`), float32
#: elsewhere (GPUs included).  Why: there a pass takes half the time, and the network passes are most of a
#: global search's time (chest CT: 19 of 32 s); the capture-range cases end as well in bfloat16 as in
#: float32 (docs/benchmarks.md, "DISA in bfloat16")
DISA_PRECISIONS = ("auto",) + PRECISIONS


def _boxes_overlap(a: Volume, b: Volume) -> bool:
    ca, cb = a.geometry.corner_points(), b.geometry.corner_points()
    lo, hi = np.maximum(ca.min(0), cb.min(0)), np.minimum(ca.max(0), cb.max(0))
    return bool(np.all(lo < hi))


def centred_initial_pose(fixed: Volume, moving: Volume) -> RigidTransform:
    """The default start: no rotation, the fixed image's centre mapped onto the moving image's centre."""
    c_f = np.asarray(fixed.geometry.center, dtype=np.float64)
    c_m = np.asarray(moving.geometry.center, dtype=np.float64)
    params = torch.as_tensor(np.concatenate([np.zeros(3), c_m - c_f]))[None]
    return RigidTransform(params, c_f)


def _settings(options: RegistrationOptions) -> SearchSettings:
    names = {f.name for f in fields(SearchSettings)}
    chosen = {k: v for k, v in options.extra.items() if k in names}
    return SearchSettings(search=options.search, **chosen)


def _radius_mm(objective: FeatureObjective, center: torch.Tensor) -> float:
    """Weighted RMS distance of the compared points from the centre: the lever arm of a rotation."""
    d2 = ((objective.points - center.to(objective.points)) ** 2).sum(1)
    return float(torch.sqrt((d2 * objective.weights.double()).sum()).clamp_min(10.0))


def _check_extra(options: RegistrationOptions) -> None:
    unknown = set(options.extra) - _EXTRA_KEYS
    if unknown:
        raise InvalidParameterError(f"unknown option(s) {sorted(unknown)}; known: {sorted(_EXTRA_KEYS)}")
    mode = options.extra.get("deformable", "dense")
    if mode not in ("dense", "bspline"):
        raise InvalidParameterError(f"deformable must be 'dense' or 'bspline', got {mode!r}")
    weighting = options.extra.get("affine_weighting", "support")
    if weighting not in AFFINE_WEIGHTINGS:
        raise InvalidParameterError(f"affine_weighting must be {' or '.join(map(repr, AFFINE_WEIGHTINGS))}, "
                                    f"got {weighting!r}")
    stride = options.extra.get("dense_descriptor_stride", DEFAULT_DENSE_DESCRIPTOR_STRIDE)
    if stride not in DENSE_DESCRIPTOR_STRIDES:
        raise InvalidParameterError(f"dense_descriptor_stride must be one of {DENSE_DESCRIPTOR_STRIDES} (the DISA "
                                    f"map every 4 or 8 mm), got {stride!r}")
    for key, default in (("disa_comparison", DEFAULT_DISA_COMPARISON),
                         ("dense_disa_comparison", DEFAULT_DENSE_DISA_COMPARISON)):
        if options.extra.get(key, default) not in DISA_COMPARISONS:
            raise InvalidParameterError(f"{key} must be one of {DISA_COMPARISONS}, got {options.extra.get(key)!r}")
    if options.extra.get("disa_precision", "auto") not in DISA_PRECISIONS:
        raise InvalidParameterError(f"disa_precision must be one of {DISA_PRECISIONS}, got "
                                    f"{options.extra.get('disa_precision')!r}")
    initial = options.extra.get("initial")
    if initial is not None and not isinstance(initial, LinearTransform):
        raise InvalidParameterError("the initial transform must be a linear (rigid or affine) transform")


def disa_precision(extra: dict, device: torch.device) -> str:
    """The DISA network's arithmetic for a run: ``extra["disa_precision"]``, with "auto" resolved for ``device``."""
    chosen = extra.get("disa_precision", "auto")
    if chosen != "auto":
        return chosen
    return "bfloat16" if native_bfloat16(device) else "float32"


def _refinement(kind: str, extra: dict):
    """The polish a run makes: extra["refine"], disa-* default :data:`DEFAULT_REFINE`; None for none."""
    refine = extra.get("refine", DEFAULT_REFINE if kind == "disa" else None)
    return None if refine in (None, "none") else refine


def register_with_features(kind: str, mode: str, fixed: Volume, moving: Volume,
                           options: RegistrationOptions) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` with ``kind`` features ("disa" | "mind") and ``mode``
    ("rigid" | "affine" | "deformable")."""
    method = f"{kind}-{mode}"
    validate_registration_input(fixed, "fixed", method)
    validate_registration_input(moving, "moving", method)
    _check_extra(options)
    refine = options.extra.get("refine")
    if refine not in (None, "none") and (kind != "disa" or refine not in REFINEMENTS):
        raise InvalidParameterError(f"refine={refine!r} is not available for {method}; disa-* methods take "
                                    f"refine={' or '.join(map(repr, REFINEMENTS))}")
    settings = _settings(options)
    settings.validate()
    device = resolve_device(options.device)
    try:
        return _register(kind, mode, fixed, moving, options, settings, device)
    except torch.cuda.OutOfMemoryError:
        if device.type != "cuda":
            raise
        torch.cuda.empty_cache()
        warnings.warn(f"GPU out of memory during {method}; running it again on the CPU (slower)", RuntimeWarning,
                      stacklevel=2)
        return _register(kind, mode, fixed, moving, options, settings, torch.device("cpu"))


def _register(kind: str, mode: str, fixed: Volume, moving: Volume, options: RegistrationOptions,
              settings: SearchSettings, device: torch.device) -> RegistrationResult:
    method = f"{kind}-{mode}"
    start = time.perf_counter()
    scope = ProgressScope(options.progress)
    extra = options.extra
    if not _boxes_overlap(fixed, moving):
        warnings.warn("the fixed and moving volumes do not overlap in physical space; starting from their centres "
                      "aligned", RuntimeWarning, stacklevel=3)
    initial = extra.get("initial") or centred_initial_pose(fixed, moving)
    scope(0.0, "computing features")
    # loaded once (hash check and all): the polish and the orientation bank run the network again
    model = extra.get("model")
    if kind == "disa" and model is None:
        model = load_disa_network("disa", device=device)
    precision = disa_precision(extra, device)
    pair: FeaturePair = feature_pair(kind, fixed, moving, device, model=model, precision=precision,
                                     sign_symmetric=bool(extra.get("disa_sign_symmetric", True)),
                                     fixed_mask=options.fixed_mask, moving_mask=options.moving_mask,
                                     fixed_modality=extra.get("fixed_modality"),
                                     moving_modality=extra.get("moving_modality"))
    if options.cancel is not None:
        options.cancel.raise_if_cancelled()
    # the affine stage compares the centred dot product: with the cosine the 5%-scaling test case ended
    # 1.62 mm off instead of 1.26 mm; the rigid stages compare the cosine (capture range, chest CT: 7
    # of 8 under 2 mm instead of 5; docs/benchmarks.md)
    plain = pair
    if kind == "disa" and extra.get("disa_comparison", DEFAULT_DISA_COMPARISON) == "cosine":
        pair = unit_length_pair(pair)
    history = [RegistrationStep("features", pair.seconds)]
    center = torch.as_tensor(np.asarray(fixed.geometry.center), dtype=torch.float64)
    fine = FeatureObjective(pair, settings.fine_points)
    radius = _radius_mm(fine, center)
    rigid_p = RigidParametrization(center, radius)
    with torch.no_grad():
        before = float(fine.value(initial.to(device=device, dtype=torch.float64))[0])

    t0 = time.perf_counter()
    x_init = rigid_p.initial(initial if isinstance(initial, RigidTransform) else nearest_rotation_pose(initial))
    refine = _refinement(kind, extra)
    rigid_end = 1.0 if mode == "rigid" else 0.6
    search_end = 0.5 * rigid_end if refine else rigid_end
    if kind == "disa" and refine == "disa" and settings.search == "global":
        from .orientation_bank import bank_search

        outcome = bank_search(pair, rigid_p, x_init, settings, _turned_fixed_pairs(pair, fixed, options, model, device),
                              options.seed, scope.sub(0.05, search_end), options.cancel)
    else:
        outcome = search_pose(pair, rigid_p, x_init, settings, options.seed, scope.sub(0.05, search_end),
                              options.cancel)
    history.append(RegistrationStep(f"rigid ({settings.search})", time.perf_counter() - t0, outcome.iterations,
                                    {"evaluations": outcome.evaluations, "similarity": outcome.similarity,
                                     **{k: round(v, 3) for k, v in outcome.stages.items()}}))
    transform = rigid_p.transform(outcome.x)
    evaluations = outcome.evaluations
    local = SearchSettings(**{**vars(settings), "search": "local"})
    refined = {}
    if refine == "disa":
        t1 = time.perf_counter()
        scope(search_end, "refining on DISA descriptors of the resampled moving image")
        poses = [transform]
        if settings.search == "global" and outcome.candidates is not None:
            poses = [rigid_p.transform(x[None]) for x in outcome.candidates[:POLISH_CANDIDATES]]
        polish = _resampled_polish(poses, pair, rigid_p, fixed, moving, options, model, local, device,
                                   scope.sub(search_end, rigid_end))
        transform, outcome = polish["pose"], polish["outcome"]
        evaluations += polish["evaluations"]
        refined = {"refine": refine, "disa_similarity_after_refinement": outcome.similarity,
                   "refine_candidates": len(poses), "refine_chosen_candidate": polish["chosen"]}
        history.append(RegistrationStep("rigid refinement (DISA, moving resampled at the found pose, local)",
                                        time.perf_counter() - t1, outcome.iterations,
                                        {"evaluations": polish["evaluations"], "similarity": outcome.similarity,
                                         "features_seconds": round(polish["seconds"], 3),
                                         "candidates": len(poses), "chosen_candidate": polish["chosen"],
                                         "candidate_similarities": ", ".join(
                                             f"{v:.4f}" for v in polish["candidate_similarities"])}))
    elif refine:
        t1 = time.perf_counter()
        scope(search_end, f"refining with {refine} features")
        pair = plain = feature_pair(refine, fixed, moving, device, fixed_mask=options.fixed_mask,
                                    moving_mask=options.moving_mask, fixed_modality=extra.get("fixed_modality"),
                                    moving_modality=extra.get("moving_modality"))
        outcome = search_pose(pair, rigid_p, rigid_p.initial(transform), local, options.seed,
                              scope.sub(search_end, rigid_end), options.cancel)
        transform = rigid_p.transform(outcome.x)
        evaluations += outcome.evaluations
        refined = {"refine": refine, f"{refine}_similarity_after_refinement": outcome.similarity}
        history.append(RegistrationStep(f"rigid refinement ({pair.name}, local)", time.perf_counter() - t1,
                                        outcome.iterations, {"evaluations": outcome.evaluations,
                                                             "similarity": outcome.similarity,
                                                             "features_seconds": round(pair.seconds, 3)}))
    if mode in ("affine", "deformable"):
        t1 = time.perf_counter()
        affine_p = AffineParametrization(center, radius)
        weighting = extra.get("affine_weighting", DEFAULT_AFFINE_WEIGHTING[plain.comparison])
        affine_pair = plain if weighting == "variance" else replace(plain, weight=support_weights(plain.weight))
        outcome = search_pose(affine_pair, affine_p, affine_p.initial(transform), local, options.seed,
                              scope.sub(0.6, 0.75 if mode == "deformable" else 1.0), options.cancel)
        transform = affine_p.transform(outcome.x)
        evaluations += outcome.evaluations
        history.append(RegistrationStep("affine (local)", time.perf_counter() - t1, outcome.iterations,
                                        {"evaluations": outcome.evaluations, "similarity": outcome.similarity,
                                         "weighting": weighting}))
    if mode == "deformable":
        deformable_pair = pair
        if pair.comparison == "dot" and extra.get("deformable", "dense") == "dense":
            deformable_pair = _dense_disa_pair(fixed, moving, extra, options, model, device, precision)
            history.append(RegistrationStep(f"features for the dense stage ({deformable_pair.name})",
                                            deformable_pair.seconds))
        transform, step = _deformable(deformable_pair, transform, fixed, extra, local, options, scope.sub(0.75, 1.0),
                                      center, radius)
        history.append(step)
        evaluations += int(step.figures.get("evaluations", 0))
    transform = transform.detach().to(device="cpu")
    with torch.no_grad():
        after = float(fine.value(transform.to(device=device)))
    scope(1.0, "warping the moving volume")
    warped = warp_volume(moving.float(), transform, fixed.geometry)
    figures = {
        f"{kind}_similarity_before": before, f"{kind}_similarity_after": after,
        "evaluations": evaluations, "search": settings.search, "features": pair.name,
        "feature_points": fine.point_count, "seed": options.seed, "refine": refine or "none", **refined,
    }
    if kind == "disa":
        figures["disa_precision"] = precision
    if kind == "disa" and extra.get("model") is None:
        from ..weights.manifest import model_status

        status = model_status("disa")
        if status:  # the shipped weights' known limits travel with every result made with them
            figures["weights_status"] = status
    if mode == "deformable":
        figures.update(_folding(transform, fixed))
    if settings.search == "global":
        figures.update(starts=settings.starts, range_deg=settings.range_deg, range_mm=settings.range_mm)
    return RegistrationResult(method, transform, warped, fixed, moving, figures=figures, history=history,
                              device=describe_device(device), seconds=time.perf_counter() - start)


#: rounds of :func:`_resampled_polish` at most, and the residual motion (mm: translation of the
#: centre plus the rotation angle times the compared points' lever arm) below which it stops: a
#: far-off search result needs a second look from nearer
POLISH_ROUNDS, POLISH_TOLERANCE_MM = 3, 0.5
#: best distinct poses of a global search that :func:`_resampled_polish` re-ranks by a first round each
POLISH_CANDIDATES = 4


def _resampled_polish(poses: list[RigidTransform], pair: FeaturePair, rigid_p: RigidParametrization,
                      fixed: Volume, moving: Volume, options: RegistrationOptions, model: torch.nn.Module,
                      local: SearchSettings, device: torch.device, scope: ProgressScope) -> dict:
    """Polish the best of ``poses`` on DISA descriptors of the moving image resampled onto the fixed grid.

    Why: the objective compares the fixed descriptor at x with the moving one at T(x), and a
    descriptor is not turned with the image.  Descriptors that follow LC² closely describe a patch
    and its rotated copy differently, so when the moving image is turned by tens of degrees the
    objective's optimum drifts (5–7 mm at 35° for the distilled weights, docs/benchmarks.md).  After
    the search the remaining rotation is small; describing the moving image in the fixed frame at the
    found pose (one more forward pass) and searching the small residual motion r removes the drift.
    The pose becomes pose ∘ r, a single rigid transform; this repeats (at most POLISH_ROUNDS times)
    while r moves the points by more than POLISH_TOLERANCE_MM.

    Several ``poses`` (a global search's best distinct results, best first): each gets the first round,
    and the one whose similarity is then highest goes on.  Why: the search ranks its candidates on
    descriptors of the moving image as it is, turned by up to tens of degrees, where the drift can
    also put a wrong basin first (Kirby21 T2 at 100 mm, docs/benchmarks.md); after resampling, every
    candidate is judged on descriptors in the fixed frame, against the same fixed map and weights.

    Returns a dict: ``pose``, ``outcome`` (the last search), ``seconds`` (features), ``evaluations``
    (all rounds), ``candidate_similarities`` (after each candidate's first round) and ``chosen`` (its index).
    """
    from .features import with_new_moving

    extra = options.extra
    identity = RigidTransform.identity(center=rigid_p.center.reshape(-1, 3)[0].tolist())
    steps = len(poses) + POLISH_ROUNDS - 1
    totals = {"seconds": 0.0, "evaluations": 0}
    # anti-aliased once at its own resolution, then resampled per pose straight onto the fixed image's 2 mm
    # grid (the network's), not onto the fixed image's own grid: a full-resolution scan is not resampled at
    # full resolution in every round (docs/benchmarks.md, "DISA on full-resolution scans")
    smoothed = smooth_for_disa(moving, modality=extra.get("moving_modality"))
    grid = fixed.geometry.resampled(DISA_SPACING_MM)

    def one_round(pose: RigidTransform, step: int):
        # outside the moving field of view: its lowest value (air for CT and MR), not 0 (soft tissue in CT)
        resampled = warp_volume(smoothed, pose, grid, default_value=float(moving.data.min()))
        mask = (warp_volume(options.moving_mask.float(), pose, grid, interpolation="nearest")
                if options.moving_mask is not None else None)
        again = with_new_moving(pair, resampled, device, model=model, moving_mask=mask,
                                moving_modality=extra.get("moving_modality"),
                                sign_symmetric=bool(extra.get("disa_sign_symmetric", True)))
        outcome = search_pose(again, rigid_p, rigid_p.initial(identity), local, options.seed,
                              scope.sub(step / steps, (step + 1) / steps), options.cancel)
        totals["seconds"] += again.seconds
        totals["evaluations"] += outcome.evaluations
        residual = rigid_p.transform(outcome.x).to(device="cpu", dtype=torch.float64)
        h = pose.to(device="cpu", dtype=torch.float64).homogeneous() @ residual.homogeneous()
        composed = rigid_p.transform(coordinates_of(rigid_p, h))
        return composed, outcome, _residual_motion_mm(residual, rigid_p)

    firsts = [one_round(p, k) for k, p in enumerate(poses)]
    similarities = [first[1].similarity for first in firsts]
    chosen = int(np.argmax(similarities))
    pose, outcome, moved_mm = firsts[chosen]
    for round_index in range(1, POLISH_ROUNDS):
        if moved_mm < POLISH_TOLERANCE_MM:
            break
        pose, outcome, moved_mm = one_round(pose, len(poses) + round_index - 1)
    return {"pose": pose, "outcome": outcome, "seconds": totals["seconds"], "evaluations": totals["evaluations"],
            "candidate_similarities": similarities, "chosen": chosen}


def _turned_fixed_pairs(pair: FeaturePair, fixed: Volume, options: RegistrationOptions, model: torch.nn.Module,
                        device: torch.device):
    """For the orientation bank: R ↦ the DISA pair of the fixed image turned by R (x ↦ fixed(R(x))),
    its mask turned alike, against ``pair``'s moving map."""
    from .features import with_new_fixed

    extra = options.extra
    # as in the polish: anti-aliased once, each turned copy made on the 2 mm grid the network sees
    smoothed = smooth_for_disa(fixed, modality=extra.get("fixed_modality"))
    grid = fixed.geometry.resampled(DISA_SPACING_MM)

    def turned(rotation: RigidTransform) -> FeaturePair:
        image = warp_volume(smoothed, rotation, grid, default_value=float(fixed.data.min()))
        mask = (warp_volume(options.fixed_mask.float(), rotation, grid, interpolation="nearest")
                if options.fixed_mask is not None else None)
        return with_new_fixed(pair, image, device, model=model, fixed_mask=mask,
                              fixed_modality=extra.get("fixed_modality"),
                              sign_symmetric=bool(extra.get("disa_sign_symmetric", True)))

    return turned


def _residual_motion_mm(residual: RigidTransform, rigid_p: RigidParametrization) -> float:
    """How far a residual motion moves points at the parametrisation's lever arm: |t| + radius·angle."""
    h = residual.homogeneous()[0]
    angle = torch.arccos(((torch.trace(h[:3, :3]) - 1) / 2).clamp(-1, 1))
    centre = rigid_p.center.reshape(-1, 3)[0].to(h)
    shift = h[:3, :3] @ centre + h[:3, 3] - centre
    return float(shift.norm() + rigid_p.radius * angle)


def _dense_disa_pair(fixed: Volume, moving: Volume, extra: dict, options: RegistrationOptions,
                     model: torch.nn.Module, device: torch.device, precision: str = "float32") -> FeaturePair:
    """The DISA maps the dense stage compares, at ``extra["dense_descriptor_stride"]`` and compared as
    ``extra["dense_disa_comparison"]`` says."""
    stride = extra.get("dense_descriptor_stride", DEFAULT_DENSE_DESCRIPTOR_STRIDE)
    pair = feature_pair("disa", fixed, moving, device, model=model,
                        sign_symmetric=bool(extra.get("disa_sign_symmetric", True)),
                        fixed_mask=options.fixed_mask, moving_mask=options.moving_mask,
                        fixed_modality=extra.get("fixed_modality"), moving_modality=extra.get("moving_modality"),
                        output_stride=stride, precision=precision)
    compared = extra.get("dense_disa_comparison", DEFAULT_DENSE_DISA_COMPARISON)
    return cosine_pair(pair) if compared == "cosine" else pair


def _folding(transform, fixed: Volume) -> dict:
    """Jacobian determinant of the final map on the fixed image's box at 2 mm: folding in percent."""
    from ..transforms.jacobian import folding_fraction, jacobian_determinant

    det = jacobian_determinant(transform, fixed.geometry.resampled(2.0))
    return {"folding_percent": 100.0 * folding_fraction(det), "jacobian_min": float(det.data.min()),
            "jacobian_max": float(det.data.max())}


def _deformable(pair: FeaturePair, pose: LinearTransform, fixed: Volume, extra: dict, local: SearchSettings,
                options: RegistrationOptions, scope: ProgressScope, center, radius):
    t0 = time.perf_counter()
    if extra.get("deformable", "dense") == "bspline":
        spline_p = PoseWithBSpline(AffineParametrization(center, radius), fixed.geometry,
                                   float(extra.get("control_spacing_mm", 40.0)))
        outcome = search_pose(pair, spline_p, spline_p.initial(pose), local, options.seed, scope, options.cancel)
        transform = spline_p.transform(outcome.x)
        return transform, RegistrationStep("pose + B-spline (local)", time.perf_counter() - t0, outcome.iterations,
                                           {"evaluations": outcome.evaluations, "similarity": outcome.similarity,
                                            "control_points": int(np.prod(spline_p.grid.shape))})
    from .dense import DenseSettings, dense_displacement

    dense_settings = extra.get("dense") or DenseSettings()
    field = dense_displacement(pair, pose, dense_settings, scope, options.cancel)
    transform = CompositeTransform([pose, field])
    return transform, RegistrationStep("dense discrete + regularisation", time.perf_counter() - t0, 0,
                                       {"grid_spacing_mm": dense_settings.grid_spacing_mm})
