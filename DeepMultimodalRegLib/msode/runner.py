"""``deepmmreg register --method msode-rigid|msode-bspline|msode-dense|msode-hybrid``.

The runner prepares both images on their working grids, integrates the trained MS-ODE model(s)
without gradients and returns the library's :class:`RegistrationResult`: the transform (rigid, or
``Composite[pre, B-spline | field]``), the warped moving volume at full resolution, and figures
(the number of function evaluations per level and in total, the solvers, the MIND-SSC distance
before and after on the working grid, which model each stage used, the time).  ``options.extra`` may
hold ``weights`` (a state_dict file; for the hybrid ``weights`` or ``weights_deformable`` is the B-spline
model and ``weights_rigid`` the rigid one, default the shipped ``msode_rigid``; a B-spline stage without
a file runs the untrained gradient flow of :mod:`.flow` while no trained B-spline model ships) and
``solvers`` (the paper's notation, e.g. ``"F(0.25)-F(0.25)-F(0.5)"``).

``options.search == "global"`` (msode-rigid and the rigid stage of msode-hybrid; not in the paper)
runs the rigid ODE from a grid of starting rotations and keeps the best by MIND-SSC level by level
(:mod:`.multistart`); ``extra["range_deg"]`` sets the grid's range (default ±50° per axis, 27 starts).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch

from ..device import resolve_device
from ..errors import InvalidParameterError, NotAvailableError
from ..image.validation import validate_registration_input
from ..image.volume import Volume
from ..methods.registry import RegistrationOptions
from ..progress import ProgressScope
from ..result import RegistrationResult, RegistrationStep
from ..transforms.bspline import BSplineTransform
from ..transforms.composite import CompositeTransform
from ..transforms.displacement import DisplacementFieldTransform
from ..transforms.resample import warp_volume
from .grids import centre_of_mass, level_geometries, prepare, pyramid
from .model import MSODE, PairBatch
from .multistart import DEFAULT_RANGE_DEG, multistart_solve, rotation_starts
from .solvers import parse_solvers
from .warp import rigid_export, rigid_homogeneous, translation_homogeneous

#: shipped weights per parameterisation (names in weights/manifest.json)
SHIPPED = {"rigid": "msode_rigid", "bspline": "msode_bspline", "dense": "msode_dense"}


#: what reports say when no B-spline model ships and the untrained gradient flow stands in (msode/flow.py)
BUILT_IN_FLOW = "untrained MIND-SSC gradient flow (no trained B-spline model ships)"


def load_model(kind: str, weights: Optional[str] = None, device="cpu") -> MSODE:
    """A model: from ``weights`` (a state_dict file) or the shipped ``msode_<kind>``; for a B-spline model
    while none ships, the untrained gradient flow of :mod:`.flow` (what the benchmarks measure).
    ``model.source`` says which, for the report.

    A missing file, a file that is no MS-ODE state dict, a model of another kind and a kind with no
    shipped model (when ``weights`` is empty) are refused with a message naming what is wrong."""
    if weights:
        if not Path(weights).is_file():
            raise InvalidParameterError(f"MS-ODE model file {str(weights)!r} does not exist")
        try:
            model = MSODE.from_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        except Exception as error:  # not a torch file, not a state dict, or one of another network
            raise InvalidParameterError(f"{str(weights)!r} is not an MS-ODE {kind} model file ({error})") from error
        source = str(weights)
    else:
        from ..weights.manifest import load_manifest, load_state_dict

        name = SHIPPED[kind]
        if name in {e.name for e in load_manifest()}:
            model, source = MSODE.from_state_dict(load_state_dict(name)), f"shipped {name}"
        elif kind == "bspline":
            from .flow import bspline_flow

            model, source = bspline_flow(), BUILT_IN_FLOW
        else:
            raise NotAvailableError(
                f"no trained MS-ODE {kind} model is shipped in this version; train one with "
                f"`deepmmreg train msode --kind {kind} -o DIR` and pass its weights")
    model.source = source
    if model.config.kind != kind:
        raise NotAvailableError(f"the weights hold an MS-ODE {model.config.kind} model, a {kind} model is needed")
    return model.to(device).eval()


#: models :func:`stage_models` loaded, kept for the next registration in this process (a Slicer session or a
#: benchmark registers many pairs).  Why: loading checks a SHA-256, unpickles and builds the networks, 40-60 ms
#: of a 1.3 s hybrid on the 2-core VM (ad hoc).  Keyed by the file's path, size and modification time (and the
#: manifest's checksum for a shipped model), so a replaced or edited file is loaded, and checked, afresh.
_LOADED_MODELS: dict = {}
_LOADED_MODELS_KEPT = 4


def _file_stamp(path: Optional[Path]):
    if path is None or not path.is_file():
        return None
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _registration_model(kind: str, weights: Optional[str], device) -> MSODE:
    """:func:`load_model`'s model, loaded once per file and device; the runner only reads it (no_grad, eval)."""
    if weights:
        key = (kind, _file_stamp(Path(weights)), str(device))
    else:
        from ..weights.manifest import load_manifest

        entry = next((e for e in load_manifest() if e.name == SHIPPED[kind]), None)
        key = (kind, None if entry is None else (entry.sha256, _file_stamp(entry.path)), str(device))
    model = _LOADED_MODELS.get(key)
    if model is None or key[1] is None and weights:  # a path that is no file: let load_model say so
        model = load_model(kind, weights, device)
        _LOADED_MODELS[key] = model
        while len(_LOADED_MODELS) > _LOADED_MODELS_KEPT:
            _LOADED_MODELS.pop(next(iter(_LOADED_MODELS)))
    return model


def stage_models(kind: str, extra: dict, device="cpu") -> tuple[Optional[MSODE], Optional[MSODE]]:
    """(rigid model, deformable model) of ``msode-<kind>``, None for a stage the method does not have.

    ``extra["weights"]`` is msode-rigid's model, or the deformable stage's for the other kinds (the
    CLI's --weights); ``weights_rigid`` / ``weights_deformable`` name a stage explicitly (msode-hybrid's
    rigid stage defaults to the shipped msode_rigid, its B-spline stage to :func:`load_model`'s default)."""
    rigid = deformable = None
    if kind in ("rigid", "hybrid"):
        rigid = _registration_model("rigid", extra.get("weights_rigid")
                                    or (extra.get("weights") if kind == "rigid" else None), device)
    if kind != "rigid":
        deform_kind = "bspline" if kind in ("bspline", "hybrid") else "dense"
        deformable = _registration_model(deform_kind, extra.get("weights_deformable") or extra.get("weights"), device)
    return rigid, deformable


def _reusable_pair(pairs: PairBatch, prepared_for: MSODE, model: MSODE) -> Optional[PairBatch]:
    """``pairs`` (prepared for ``prepared_for``) as :func:`prepare_pair` would give them for ``model``,
    or None when the working grids differ or ``model`` needs more pyramid levels."""
    a, b = prepared_for.config, model.config
    if (a.size, float(a.spacing_mm)) != (b.size, float(b.spacing_mm)) or b.levels > a.levels:
        return None
    return pairs.finest(b.levels)


def prepare_pair(fixed: Volume, moving: Volume, model: MSODE, device) -> PairBatch:
    c = model.config
    f = prepare(fixed, c.size, c.spacing_mm)
    m = prepare(moving, c.size, c.spacing_mm)
    fd, md = f.data[None, None].to(device), m.data[None, None].to(device)
    return PairBatch(pyramid(fd, c.levels), pyramid(md, c.levels), level_geometries(f.geometry, c.levels),
                     level_geometries(m.geometry, c.levels), centre_of_mass(fd, f.geometry),
                     centre_of_mass(md, m.geometry))


def _global_starts(options: RegistrationOptions, device) -> torch.Tensor:
    """θ_0 of the rigid global search (run_msode refuses it for msode-bspline|dense up front)."""
    if options.extra.get("starts") is not None or options.extra.get("range_mm") is not None:
        raise InvalidParameterError(
            "MS-ODE's global search starts from a grid of rotations (every 50° within ±--range-deg per axis); "
            "--starts and --range-mm do not apply to it")
    return rotation_starts(float(options.extra.get("range_deg", DEFAULT_RANGE_DEG)), device=device)


def _solve(model: MSODE, pairs: PairBatch, options: RegistrationOptions, scope: ProgressScope, pre=None,
           before: Optional[float] = None):
    """θ(T) of ``model`` on ``pairs``, its solver record and figures; ``before``: the MIND-SSC distance at θ = 0
    when the caller knows it already (a hybrid's deformable stage starts where the rigid stage ended)."""
    solvers = parse_solvers(options.extra["solvers"]) if options.extra.get("solvers") else None
    levels = model.config.levels
    search = options.search == "global" and model.config.kind == "rigid"

    def on_level(level, theta):
        scope((level + 1) / levels, f"level {level + 1}/{levels}" + (f", {len(theta)} start(s) left" if search else ""))
    with torch.no_grad():
        if search:
            starts = _global_starts(options, pairs.fixed[-1].device)
            theta, info = multistart_solve(model, pairs, starts, solvers=solvers, cancel=options.cancel,
                                           on_level=on_level)
            field = model.level_field(pairs, levels - 1)
            extra = {"search": "global", "starts": info.starts, "survivors_per_level": list(info.keep),
                     "pose_evaluations": info.pose_evaluations,
                     "chosen_start_deg": [round(math.degrees(v), 1) for v in starts[info.chosen_start, :3].tolist()]}
        else:
            theta, info, fields = model.solve(pairs, pre=pre, solvers=solvers, cancel=options.cancel, on_level=on_level)
            field, extra = fields[-1], {}
        # θ = 0 (the centre-of-mass start) and the result, on the finest level's grid
        if before is None:
            before = float(field.mind_distance(torch.zeros_like(theta))[0])
        after = float(field.mind_distance(theta)[0])
    if after > before:
        # never hand back a result the similarity likes less than the start.  Rigid: near the answer
        # (images nearly aligned already) the shipped model's learned levels can push a pose several mm
        # away and its 4 mm flow does not always return (docs/benchmarks.md, global-search section,
        # "Near-aligned pairs").  Deformable: on a pair that is aligned already, the untrained B-spline
        # flow can run away at a few control points (~100 mm on the co-registered Kirby21 FLAIR → T1,
        # its MIND-SSC distance up from 0.0061 to 0.0068–0.0100; docs/benchmarks.md, "MS-ODE hybrid");
        # the start is then the pre-transform alone (for the hybrid, the rigid stage's result)
        theta, after = torch.zeros_like(theta), before
        extra["kept_start"] = True
    used = solvers or model.config.solver_specs()
    return theta, info, {"nfe_per_level": info.nfe, "nfe": info.total_nfe, **extra,
                         "solvers": "-".join(str(s) for s in used), "mind_ssd_before": before,
                         "mind_ssd_after": after}


def run_msode(kind: str, fixed: Volume, moving: Volume, options: RegistrationOptions) -> RegistrationResult:
    """Register with the MS-ODE model(s) of ``kind`` (rigid | bspline | dense | hybrid)."""
    method = f"msode-{kind}"
    validate_registration_input(fixed, "fixed", method=method)
    validate_registration_input(moving, "moving", method=method)
    if options.search not in ("local", "global"):
        raise InvalidParameterError(f"search must be 'local' or 'global', got {options.search!r}")
    if options.search == "global" and kind in ("bspline", "dense"):
        raise InvalidParameterError(f"{method} has no global search; use msode-hybrid --search global, whose rigid "
                                    "stage searches globally")
    start = time.perf_counter()
    device = resolve_device(options.device)
    scope = ProgressScope(options.progress, cancel=options.cancel)
    extra = options.extra
    history, figures = [], {"similarity": "mind-ssc (working grid)", "device": str(device)}
    rigid_model, deform_model = stage_models(kind, extra, device)
    scope(0.0, "preparing images")

    transform = None
    if kind in ("rigid", "hybrid"):
        t0 = time.perf_counter()
        pairs = prepare_pair(fixed, moving, rigid_model, device)
        theta, info, fig = _solve(rigid_model, pairs, options, scope.sub(0.05, 0.5 if kind == "hybrid" else 0.9))
        transform = rigid_export(theta, pairs.c_fixed, pairs.c_moving)
        p = theta[0].tolist()
        fig["rotation_deg"] = [round(math.degrees(v), 3) for v in p[:3]]
        fig["translation_mm"] = [round(v, 3) for v in (transform.translation[0].tolist())]
        fig["model"] = rigid_model.source
        history.append(RegistrationStep("msode-rigid", time.perf_counter() - t0, info.total_nfe, fig))
        figures.update({f"rigid_{k}" if kind == "hybrid" else k: v for k, v in fig.items()})
        pre_h = rigid_homogeneous(theta, pairs.c_fixed, pairs.c_moving)
    if kind != "rigid":
        t0 = time.perf_counter()
        # a hybrid whose two models share the working grid reuses the rigid stage's images
        reused = _reusable_pair(pairs, rigid_model, deform_model) if kind == "hybrid" else None
        pairs = reused or prepare_pair(fixed, moving, deform_model, device)
        if kind == "hybrid":
            pre = transform
        else:
            pre = rigid_export(torch.zeros(1, 6, device=device), pairs.c_fixed, pairs.c_moving)
            pre_h = translation_homogeneous(pairs.c_fixed, pairs.c_moving)
        theta, info, fig = _solve(deform_model, pairs, options, scope.sub(0.5 if kind == "hybrid" else 0.05, 0.9),
                                  pre=pre_h.to(pairs.fixed[-1].dtype),
                                  before=figures["rigid_mind_ssd_after"] if reused is not None else None)
        fixed_grid = pairs.fixed_geometries[-1]
        if deform_model.config.kind == "bspline":
            deformable = BSplineTransform(deform_model.control_grid(fixed_grid), theta.detach().double().cpu())
        else:
            deformable = DisplacementFieldTransform(fixed_grid, theta.detach().float().cpu())
        transform = CompositeTransform([pre.to("cpu", torch.float64), deformable])
        fig["model"] = deform_model.source
        history.append(RegistrationStep(f"msode-{deform_model.config.kind}", time.perf_counter() - t0,
                                        info.total_nfe, fig))
        figures.update({f"deformable_{k}" if kind == "hybrid" else k: v for k, v in fig.items()})
    figures["nfe_total"] = sum(s.iterations for s in history)
    figures["iterations"] = figures["nfe_total"]
    scope(0.92, "warping the moving volume")
    warped = warp_volume(moving.float(), transform.to("cpu"), fixed.geometry)
    seconds = time.perf_counter() - start
    figures["seconds"] = round(seconds, 3)
    scope(1.0, "done")
    return RegistrationResult(method, transform, warped, fixed, moving, figures=figures, history=history,
                              device=str(device), seconds=seconds)
