"""Capture range of rigid multimodal registration: DISA, MIND-SSC, LC² and SimpleITK Mattes MI side by
side on identical cases.

    python benchmarks/disa_capture_range.py                         (full run, ≥ 20 cases per bin)
    python benchmarks/disa_capture_range.py --quick --methods disa-local,sitk-mattes   (smoke test)
    python benchmarks/disa_capture_range.py --resume --out docs/disa_capture_range_<date>.json
    python benchmarks/disa_capture_range.py --table docs/disa_capture_range_<date>.json   (table only)

**Pairs** (all resampled to 2 mm; the fixed image is the one compared against):

* ``t2``: Kirby21 subject 113, T2 → T1 (real, co-registered contrasts);
* ``flair``: Kirby21 subject 113, FLAIR → T1;
* ``ct``: the LIDC-IDRI-0001 chest CT (HU clipped to [-1024, 3071], table and air cropped away,
  central 200 mm in z) → a label-driven synthetic second contrast of it, a new random one per case,
  shifted so that the outside air is 0 like the padding of the widened field of view.
  ``--ct-contrast mr-like`` (default, ``mr_like_contrast_of_ct``): random intensity per label times
  the voxel's non-air fraction, so air is dark and lung nearly so, as in every MR sequence;
  ``--ct-contrast arbitrary`` (``synthesize_contrast``, the records before 2026-12-07): any contrast,
  air, lung and soft tissue one grey included.  Note: this CT was one of the DISA network's
  training scans (the synthetic contrasts were not).

**Cases.**  For each pair and each initial-error bin (0–25, 25–50, 50–75, 75–100 mm), rigid
transforms are drawn at random (seeded): rotations uniform within ±40° about every axis (about the
fixed image's centre), translation in a uniform random direction with a length uniform in
[0, 130] mm; a draw is kept when its initial error falls in the bin (rejection sampling, so in the
low bins small rotations dominate), case i of a bin in the (i mod 5)-th fifth of the bin.  The initial error is the mean distance ‖truth(x) − x‖ over
2000 random brain (Kirby21: T1 > 1 % of its maximum) or body (CT: the largest component above
−500 HU) voxels of the fixed image, i.e. the error of the identity, which is where every method
starts (the moving volume's grid is the fixed one widened symmetrically, so image centres
coincide).  The moving volume is ``misaligned_copy(contrast, truth, margin_mm=110)``: its field of
view is the fixed one plus 110 mm on every side, so the moved anatomy stays in view.

**Methods** (each run on the same fixed/moving volumes, ``--device`` cpu by default, torch and
SimpleITK both limited to ``--threads`` 2):

* ``disa-local`` / ``disa-global``: ``disa-rigid`` with ``search`` local / global and ``refine="none"``
  (the plain DISA search; global: ``--starts`` 500 starts within ±40°, ±150 mm, the library's defaults);
* ``disa-global-mind``: ``disa-global``, then a local rigid polish on MIND-SSC features from its
  pose (``refine="mind"``): DISA's capture range with MIND-SSC's accuracy — no longer DISA alone;
* ``disa-global-resampled``: ``disa-rigid`` global as the library runs it by default (``refine="disa"``):
  the starts spread over a bank of 9 turned copies of the fixed image, the best 4 candidates re-ranked
  and the winner polished on DISA descriptors of the moving image resampled at their pose — still DISA alone;
* ``disa-local-resampled``: ``disa-rigid`` local as the library runs it by default: the plain local
  search, then the same resampled polish;
* ``mind-local`` / ``mind-global``: ``mind-rigid``, the same engine on MIND-SSC features;
* ``lc2-local``: ``lc2-rigid`` (Powell on direct volume LC²): slow, so it runs only on the first
  ``--lc2-cases-per-bin`` cases (default 2) of every pair and bin; the table says on how many;
* ``sitk-mattes``: SimpleITK multi-resolution (4-2-1) rigid registration with Mattes MI
  (``register_rigid_mattes``), the classical peer.

Success: mean error ‖estimate(x) − truth(x)‖ over the same points < ``--success-mm`` (2 mm).  Time:
wall seconds of the whole method call (features, search, warping the output).  Evaluations: the
methods' own count (single-pose similarity evaluations; SimpleITK: optimiser iterations, one
metric-and-gradient evaluation each).

**Per-evaluation cost** (``evaluation_cost`` in the JSON; skip with ``--no-evaluation-cost``), on the
first case of the first pair: one evaluation of one pose of (a) the DISA objective (the library's
``FeatureObjective`` on the fine level, ``fine_points`` locations; without and with the gradient;
and per pose within a batch of 64), (b) the MIND-SSC objective the same way, (c) direct volume
LC² as ``lc2-rigid`` evaluates it (warp the prepared moving onto the 2 mm fixed grid, LC² radius 3,
stride 4); best of several repetitions, with ``--threads`` threads and with one (on a busy machine
every parallel region of a tiny operation waits for a descheduled thread: trust the one-thread
figures there).  Also derived from the runs: search-stage seconds divided
by evaluations, median per method.  The issue's target: DISA ≥ 300× cheaper per evaluation than LC².

The JSON record (``--out``, default ``docs/disa_capture_range_<date>.json``) is rewritten atomically
after every single run, so a stopped run keeps what it measured; ``--resume`` continues it.
Progress goes to stderr; the final markdown table (for docs/benchmarks.md) to stdout.

Issue targets: DISA-global ≥ 95 % success in every bin; DISA-global median time on the CPU ≤ 3×
SimpleITK's on the same pair; DISA per-evaluation cost ≥ 300× cheaper than LC².
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from DeepMultimodalRegLib.evaluation import foreground_points, misaligned_copy, target_registration_error
from DeepMultimodalRegLib.image.io import read_volume
from DeepMultimodalRegLib.image.volume import Volume
from DeepMultimodalRegLib.transforms.linear import RigidTransform
from DeepMultimodalRegLib.transforms.resample import warp_volume

sys.path.insert(0, str(Path(__file__).resolve().parent))
from disa_descriptor import machine_info  # noqa: E402  (shared benchmark helper: machine, versions, git commit)

REPO = Path(__file__).resolve().parents[1]
BINS_MM = ((0.0, 25.0), (25.0, 50.0), (50.0, 75.0), (75.0, 100.0))
ALL_PAIRS = ("t2", "flair", "ct")
#: the ct pair's second contrast (the default first): see the module docstring
CT_CONTRASTS = ("mr-like", "arbitrary")
ALL_METHODS = ("disa-local", "disa-local-resampled", "disa-global", "disa-global-mind", "disa-global-resampled",
               "mind-local", "mind-global", "lc2-local", "sitk-mattes")
#: method name → (library method, search)
LIBRARY_METHODS = {"disa-local": ("disa-rigid", "local"), "disa-local-resampled": ("disa-rigid", "local"),
                   "disa-global": ("disa-rigid", "global"),
                   "disa-global-mind": ("disa-rigid", "global"), "disa-global-resampled": ("disa-rigid", "global"),
                   "mind-local": ("mind-rigid", "local"), "mind-global": ("mind-rigid", "global"),
                   "lc2-local": ("lc2-rigid", "local")}
MAX_ROTATION_DEG = 40.0
MAX_TRANSLATION_MM = 130.0
SPACING_MM = 2.0
#: DISA alone with global search: the plain search and the library's default (refine="disa")
DISA_GLOBAL_METHODS = ("disa-global", "disa-global-resampled")
#: issue targets
TARGET_GLOBAL_SUCCESS = 0.95
TARGET_TIME_RATIO = 3.0
TARGET_EVALUATION_RATIO = 300.0


def log(message: str) -> None:
    print(f"[disa_capture_range {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def bin_label(b) -> str:
    return f"{b[0]:g}–{b[1]:g} mm"


# ------------------------------------------------------------------------------------------- pairs
@dataclass
class Pair:
    name: str
    description: str
    fixed: Volume
    points: torch.Tensor  # [N, 3] physical evaluation points in the fixed image
    contrast: object  # seed -> the moving contrast on the fixed grid (before misalignment)
    labels: Volume | None = None  # label map on the fixed grid, where the pair has one


def _at_2mm(volume: Volume, geometry=None) -> Volume:
    """``volume`` resampled (trilinear) onto ``geometry`` (default: its own box at 2 mm)."""
    geometry = geometry or volume.geometry.resampled(SPACING_MM)
    out = warp_volume(volume.float(), RigidTransform.identity(), geometry)
    out.name = volume.name
    return out


def _points(mask: torch.Tensor, like: Volume, count: int, seed: int) -> torch.Tensor:
    return foreground_points(like.with_data(mask.float()), count=count, seed=seed, threshold=0.5)


def load_kirby21(name: str, data_dir: Path, points: int, seed: int) -> Pair:
    folder = data_dir / "mr_kirby21_113"
    t1 = _at_2mm(read_volume(folder / "t1_mprage.nii.gz", name="kirby21_t1"))
    other = _at_2mm(read_volume(folder / f"{name}.nii.gz", name=f"kirby21_{name}"), t1.geometry)
    brain = t1.data > 0.01 * float(t1.data.max())
    return Pair(name, f"Kirby21 #113 {name.upper()} → T1 (real contrasts, co-registered), 2 mm, grid "
                      f"{tuple(t1.shape)}", t1, _points(brain, t1, points, seed), lambda seed_: other)


def load_chest_ct(data_dir: Path, points: int, seed: int, contrast_kind: str = "mr-like") -> Pair:
    """The LIDC chest CT: clipped HU, cropped to the body (no table) and the central 200 mm in z, 2 mm."""
    from scipy import ndimage

    from DeepMultimodalRegLib.image.geometry import ImageGeometry
    from DeepMultimodalRegLib.synthetic import mr_like_contrast_of_ct, synthesize_contrast

    folder = data_dir / "ct_chest_lidc0001"
    ct = read_volume(folder / "ct.nii.gz", name="lidc0001_ct").float()
    ct = ct.with_data(ct.data.clamp(-1024.0, 3071.0))
    labels = read_volume(folder / "labels.nii.gz", name="lidc0001_labels")
    # the body: largest connected component above -500 HU (leaves the table out), its bounding box
    body = ndimage.binary_opening(ct.numpy() > -500, iterations=2)
    components, count = ndimage.label(body)
    sizes = ndimage.sum(body, components, range(1, count + 1))
    body = components == (1 + int(np.argmax(sizes)))
    lo = np.array([int(np.nonzero(body.any(axis=tuple(a for a in range(3) if a != ax)))[0].min()) for ax in range(3)])
    hi = np.array([int(np.nonzero(body.any(axis=tuple(a for a in range(3) if a != ax)))[0].max()) for ax in range(3)])
    spacing_zyx = np.asarray(ct.geometry.spacing)[::-1]
    half_z = int(round(100.0 / spacing_zyx[0]))  # central 200 mm of the body in z
    mid_z = (lo[0] + hi[0]) // 2
    lo[0], hi[0] = max(lo[0], mid_z - half_z), min(hi[0], mid_z + half_z - 1)
    lo, hi = np.maximum(lo - 2, 0), np.minimum(hi + 2, np.asarray(ct.shape) - 1)  # a 2-voxel rim of air
    g = ct.geometry
    start_xyz = lo[::-1].astype(np.float64)
    origin = g.direction_matrix @ (start_xyz * np.asarray(g.spacing)) + np.asarray(g.origin)
    crop = ImageGeometry(shape=tuple(int(v) for v in hi - lo + 1), spacing=g.spacing, origin=tuple(origin),
                         direction=g.direction)
    grid = crop.resampled(SPACING_MM)
    fixed = _at_2mm(ct, grid)
    from DeepMultimodalRegLib.transforms.linear import AffineTransform
    from DeepMultimodalRegLib.transforms.resample import resample_tensor

    identity = AffineTransform.identity(1, dtype=torch.float64)
    lab = resample_tensor(labels.data.float()[None], labels.geometry, identity, grid, interpolation="nearest")[0, 0]
    lab = Volume(lab.round().to(torch.int16), grid, name="lidc0001_labels")
    body_2mm = resample_tensor(torch.from_numpy(body.astype(np.float32))[None], ct.geometry, identity, grid,
                               interpolation="nearest")[0, 0]

    # outside air (unlabelled and below -900 HU): shifted to 0 in the synthetic contrast, the value
    # misaligned_copy pads with, so its field-of-view border is no edge the CT lacks
    outside_air = (fixed.data < -900) & (lab.data == 0)

    synthesise = {"mr-like": mr_like_contrast_of_ct, "arbitrary": synthesize_contrast}[contrast_kind]

    def contrast(case_seed: int) -> Volume:
        synthetic = synthesise(fixed, lab, seed=case_seed)
        return synthetic.with_data(synthetic.data - float(synthetic.data[outside_air].mean()))

    return Pair("ct", f"LIDC-IDRI-0001 chest CT (body crop, central 200 mm) → label-synthesised {contrast_kind} "
                      f"contrast (new per case), 2 mm, grid {tuple(fixed.shape)}", fixed,
                _points(body_2mm > 0.5, fixed, points, seed), contrast, lab)


def load_pair(name: str, data_dir: Path, points: int, seed: int, ct_contrast: str = "mr-like") -> Pair:
    if name in ("t2", "flair"):
        return load_kirby21(name, data_dir, points, seed)
    if name == "ct":
        return load_chest_ct(data_dir, points, seed, ct_contrast)
    raise SystemExit(f"unknown pair {name!r}; choose from {', '.join(ALL_PAIRS)}")


# ------------------------------------------------------------------------------------------- cases
def draw_cases(pair: Pair, count: int, seed: int) -> dict[int, list[dict]]:
    """``count`` random rigid truths per bin whose initial error (identity vs truth) falls in the bin.

    Case i of a bin is drawn in the (i mod S)-th of S = min(count, 5) equal sub-intervals of the bin,
    so the cases spread over the bin instead of piling up at its upper end (where most of the volume
    of the 6-D pose box is).
    """
    center = torch.as_tensor(np.asarray(pair.fixed.geometry.center), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    slots = min(count, 5)
    wanted = []  # (bin, case index, lower, upper)
    for b, (lo, hi) in enumerate(BINS_MM):
        width = (hi - lo) / slots
        wanted += [(b, i, lo + (i % slots) * width, lo + (i % slots + 1) * width) for i in range(count)]
    found: dict[tuple[int, int], dict] = {}
    batch = 1024
    for _ in range(5000):
        if len(found) == len(wanted):
            break
        angles = (torch.rand(batch, 3, generator=g, dtype=torch.float64) * 2 - 1) * math.radians(MAX_ROTATION_DEG)
        direction = torch.randn(batch, 3, generator=g, dtype=torch.float64)
        direction = direction / direction.norm(dim=1, keepdim=True)
        length = torch.rand(batch, 1, generator=g, dtype=torch.float64) * MAX_TRANSLATION_MM
        params = torch.cat([angles, direction * length], 1)
        moved = RigidTransform(params, center).transform_points(pair.points)  # [B, N, 3]
        error = (moved - pair.points[None]).norm(dim=-1).mean(1)
        used = torch.zeros(batch, dtype=torch.bool)
        for b, i, lo, hi in wanted:
            if (b, i) in found:
                continue
            hit = torch.nonzero((error >= lo) & (error < hi) & ~used).squeeze(1)
            if hit.numel():
                k = int(hit[0])
                used[k] = True
                found[(b, i)] = {"params": params[k].tolist(), "initial_mm": float(error[k])}
    missing = [w for w in wanted if (w[0], w[1]) not in found]
    if missing:
        raise RuntimeError(f"{pair.name}: no case found for initial errors {[(w[2], w[3]) for w in missing]} mm")
    return {b: [found[(b, i)] for i in range(count)] for b in range(len(BINS_MM))}


def truth_of(case: dict, pair: Pair) -> RigidTransform:
    return RigidTransform(torch.tensor([case["params"]], dtype=torch.float64),
                          torch.as_tensor(np.asarray(pair.fixed.geometry.center), dtype=torch.float64))


# ----------------------------------------------------------------------------------------- methods
def run_method(method: str, fixed: Volume, moving: Volume, seed: int, args):
    if method == "sitk-mattes":
        from DeepMultimodalRegLib.peers.simpleitk_rigid import register_rigid_mattes

        return register_rigid_mattes(fixed, moving, seed=seed)
    from DeepMultimodalRegLib.methods.registry import RegistrationOptions, get_method

    name, search = LIBRARY_METHODS[method]
    extra = {}
    if search == "global":
        extra = {"starts": args.starts, "range_deg": args.range_deg, "range_mm": args.range_mm}
    if method in ("disa-local", "disa-global"):
        extra["refine"] = "none"  # the plain DISA search (the library polishes disa-* by default)
    if method == "disa-global-mind":
        extra["refine"] = "mind"
    if method in ("disa-global-resampled", "disa-local-resampled"):
        extra["refine"] = "disa"  # the library's default for disa-*, stated so the record says what ran
    if method == "lc2-local" and args.lc2_max_evaluations:
        extra = {"max_evaluations": args.lc2_max_evaluations}
    if method.startswith("disa") and args.disa_weights:
        extra["model"] = candidate_disa_network(args.disa_weights, args.device)
    if method.startswith("disa"):
        extra["disa_precision"] = args.disa_precision
    if method.startswith("disa") and args.disa_raw_descriptors:
        extra["disa_sign_symmetric"] = False
    options = RegistrationOptions(search=search, device=args.device, seed=seed, extra=extra)
    return get_method(name).runner(fixed, moving, options)


@functools.lru_cache(maxsize=2)
def candidate_disa_network(path: Path, device: str):
    """A DISA network with weights from ``path`` (a state_dict, loaded with weights_only=True) instead
    of the shipped ones: measure candidate weights on the registration engine before shipping them.
    Cached: every run of a benchmark uses the same network, read once."""
    from DeepMultimodalRegLib.networks.disa_net import DISANet

    model = DISANet()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device).eval()


def _search_stage(result) -> tuple[float | None, int | None]:
    """(seconds, evaluations) of the pose-search step of a library result (None for SimpleITK)."""
    for step in result.history:
        if step.name.startswith("rigid"):
            return step.seconds, step.figures.get("evaluations")
    return None, None


def run_record(method: str, pair: Pair, bin_index: int, case_index: int, case: dict, moving: Volume, seed: int,
               args) -> dict:
    truth = truth_of(case, pair)
    record = {"pair": pair.name, "bin": bin_index, "case": case_index, "method": method, "seed": seed,
              "initial_mm": case["initial_mm"]}
    start = time.perf_counter()
    try:
        result = run_method(method, pair.fixed, moving, seed, args)
    except Exception as exc:  # a crash is a failure of that run, recorded, not the end of the benchmark
        record.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-2000:],
                      seconds=time.perf_counter() - start, success=False)
        return record
    seconds = time.perf_counter() - start
    tre = target_registration_error(result.transform, truth, pair.points)
    figures = {k: v for k, v in result.figures.items() if isinstance(v, (int, float, str, bool))}
    evaluations = figures.get("evaluations", figures.get("iterations"))
    stage_s, stage_evaluations = _search_stage(result)
    record.update(error_mm=tre["mean_mm"], error_median_mm=tre["median_mm"], error_p95_mm=tre["p95_mm"],
                  error_max_mm=tre["max_mm"], success=bool(tre["mean_mm"] < args.success_mm), seconds=seconds,
                  method_seconds=result.seconds, evaluations=evaluations,
                  search_seconds=stage_s, search_evaluations=stage_evaluations,
                  estimate_params=[float(v) for v in result.transform.parameters[0]]
                  if hasattr(result.transform, "parameters") and result.transform.kind == "rigid" else None,
                  history=[{"name": s.name, "seconds": round(s.seconds, 3), "iterations": s.iterations,
                            **{k: v for k, v in s.figures.items() if isinstance(v, (int, float, str, bool))}}
                           for s in result.history],
                  figures=figures)
    return record


# ------------------------------------------------------------------------------ per-evaluation cost
def _best_time(fn, repeats: int, min_block_s: float = 0.3) -> float:
    fn()
    t0 = time.perf_counter()
    fn()
    single = time.perf_counter() - t0
    inner = max(1, min(200, int(math.ceil(min_block_s / max(single, 1e-6)))))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def evaluation_cost(pair: Pair, moving: Volume, truth: RigidTransform, args) -> dict:
    """Seconds of one similarity evaluation of one pose: DISA and MIND-SSC objectives, direct LC².

    Timed with ``--threads`` torch threads and, when that is more than one, with one thread too (tiny
    tensor operations on a busy machine pay for every parallel region: the one-thread figures are
    the robust ones there).
    """
    from DeepMultimodalRegLib.device import resolve_device
    from DeepMultimodalRegLib.disa.features import feature_pair
    from DeepMultimodalRegLib.disa.lc2_direct import LC2_RADIUS, LC2_STRIDE
    from DeepMultimodalRegLib.disa.objective import FeatureObjective
    from DeepMultimodalRegLib.disa.preprocess import DISA_SPACING_MM, prepare_for_disa
    from DeepMultimodalRegLib.disa.search import SearchSettings
    from DeepMultimodalRegLib.metrics.lc2 import volume_lc2
    from DeepMultimodalRegLib.transforms.resample import resample_tensor

    device = resolve_device(args.device)
    repeats = 2 if args.quick else 5
    # a pose near the truth (where an optimiser spends its evaluations), same for every metric
    pose = RigidTransform(truth.parameters + torch.tensor([[0.02, -0.01, 0.015, 2.0, -1.5, 1.0]], dtype=torch.float64),
                          truth.center).to(device=device)
    batch = RigidTransform(pose.parameters.expand(64, 6).clone(), pose.center[0]).to(device=device)
    fine_points = SearchSettings().fine_points
    out = {"pair": pair.name, "case": "first case of the first bin", "device": str(device), "pose": "truth + "
           "(1.1°, −0.6°, 0.9°, 2, −1.5, 1 mm)", "repeats": repeats}
    if hasattr(os, "getloadavg"):
        out["load_average_before"] = [round(v, 2) for v in os.getloadavg()]

    objectives, features_s = {}, {}
    for kind in ("disa", "mind"):
        log(f"evaluation cost: {kind} features")
        t0 = time.perf_counter()
        objectives[kind] = FeatureObjective(feature_pair(kind, pair.fixed, moving, device), fine_points)
        features_s[kind] = time.perf_counter() - t0
    f = prepare_for_disa(pair.fixed, DISA_SPACING_MM).to(device)
    m = prepare_for_disa(moving, DISA_SPACING_MM).to(device)
    background = float(m.data.min())

    def objective_times(objective) -> dict:
        def forward():
            with torch.no_grad():
                objective.value(pose)

        def with_grad():
            p = pose.parameters.clone().requires_grad_(True)
            objective.value(RigidTransform(p, pose.center)).sum().backward()

        def batched():
            with torch.no_grad():
                objective.value(batch)

        return {"one_pose_s": _best_time(forward, repeats), "one_pose_with_gradient_s": _best_time(with_grad, repeats),
                "per_pose_in_batch_of_64_s": _best_time(batched, repeats) / 64}

    def lc2_once():
        with torch.no_grad():
            warped = resample_tensor(m.data[None], m.geometry, pose, f.geometry, default_value=background)[0, 0]
            float(volume_lc2(f.data, warped, LC2_RADIUS, LC2_STRIDE))

    threads = torch.get_num_threads()
    for n in dict.fromkeys([threads, 1]):
        torch.set_num_threads(n)
        log(f"evaluation cost: timing with {n} thread(s)")
        t = {kind: {"points": o.point_count, "features_s": features_s[kind], **objective_times(o)}
             for kind, o in objectives.items()}
        t["lc2"] = {"radius_voxels": LC2_RADIUS, "stride": LC2_STRIDE, "fixed_grid": list(f.shape),
                    "one_pose_s": _best_time(lc2_once, repeats, min_block_s=1.0)}
        lc2 = t["lc2"]["one_pose_s"]
        t["lc2_over_disa"] = {"one_pose": lc2 / t["disa"]["one_pose_s"],
                              "one_pose_with_gradient": lc2 / t["disa"]["one_pose_with_gradient_s"],
                              "per_pose_in_batch_of_64": lc2 / t["disa"]["per_pose_in_batch_of_64_s"]}
        t["lc2_over_mind"] = {"one_pose": lc2 / t["mind"]["one_pose_s"]}
        out[f"threads_{n}"] = t
    torch.set_num_threads(threads)
    out["target_lc2_over_disa"] = TARGET_EVALUATION_RATIO
    if hasattr(os, "getloadavg"):
        out["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    return out


# ----------------------------------------------------------------------------------------- summary
def _median(values):
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def summarise(runs: list[dict], pairs: list[str], methods: list[str]) -> dict:
    """Success rates per bin, median time and evaluations, per pair and over all pairs."""
    out = {}
    for scope in [*pairs, "all"]:
        rows = {}
        for method in methods:
            sel = [r for r in runs if r["method"] == method and (scope == "all" or r["pair"] == scope)]
            if not sel:
                continue
            per_bin = []
            for b in range(len(BINS_MM)):
                in_bin = [r for r in sel if r["bin"] == b]
                per_bin.append({"bin": bin_label(BINS_MM[b]), "cases": len(in_bin),
                                "successes": sum(bool(r.get("success")) for r in in_bin),
                                "success_rate": (sum(bool(r.get("success")) for r in in_bin) / len(in_bin))
                                if in_bin else None,
                                "median_error_mm": _median([r.get("error_mm") for r in in_bin])})
            search = [r["search_seconds"] / r["search_evaluations"] for r in sel
                      if r.get("search_seconds") and r.get("search_evaluations")]
            rows[method] = {"bins": per_bin, "cases": len(sel), "successes": sum(bool(r.get("success")) for r in sel),
                            "crashes": sum("error" in r for r in sel),
                            "median_error_mm": _median([r.get("error_mm") for r in sel]),
                            "median_seconds": _median([r.get("seconds") for r in sel]),
                            "median_evaluations": _median([r.get("evaluations") for r in sel]),
                            "median_search_seconds_per_evaluation": _median(search)}
        if rows:
            t_sitk = rows.get("sitk-mattes", {}).get("median_seconds")
            ratio = {"target": TARGET_TIME_RATIO}
            # the DISA-alone global searches the targets are about: the plain one and the
            # library's default (resampled polish with the orientation bank)
            for method in DISA_GLOBAL_METHODS:
                key = method.replace("-", "_")
                t_disa = rows.get(method, {}).get("median_seconds")
                ratio[f"{key}_over_sitk_median_time"] = t_disa / t_sitk if t_disa and t_sitk else None
                g = rows.get(method)
                if g:
                    rates = [b["success_rate"] for b in g["bins"] if b["success_rate"] is not None]
                    ratio[f"{key}_min_bin_success"] = min(rates) if rates else None
                    ratio["target_min_bin_success"] = TARGET_GLOBAL_SUCCESS
            out[scope] = {"methods": rows, "targets": ratio}
    return out


def markdown_table(record: dict) -> str:
    summary = record.get("summary", {})
    lines = []
    a = record.get("args", {})
    header = ("| pair | method | " + " | ".join(bin_label(b) for b in BINS_MM)
              + " | all | median error (mm) | median time (s) | median evaluations |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for scope, block in summary.items():
        for method, row in block["methods"].items():
            cells = []
            for b in row["bins"]:
                cells.append(f"{100 * b['success_rate']:.0f}% ({b['successes']}/{b['cases']})" if b["cases"] else "–")
            overall = f"{100 * row['successes'] / row['cases']:.0f}% ({row['successes']}/{row['cases']})"
            name = f"**{method}**" if method in DISA_GLOBAL_METHODS else method
            crash = f" ⚠ {row['crashes']} crashed" if row["crashes"] else ""
            t, e, err = row["median_seconds"], row["median_evaluations"], row.get("median_error_mm")
            timing = f"{t:.1f} | {e:.0f}" if t is not None and e is not None else "– | –"
            timing = (f"{err:.2f}" if err is not None else "–") + " | " + timing
            lines.append(f"| {'all pairs' if scope == 'all' else scope} | {name}{crash} | " + " | ".join(cells)
                         + f" | {overall} | {timing} |")
    notes = [f"Success: mean error over brain/body points < {a.get('success_mm', 2.0):g} mm; rotations up to "
             f"±{MAX_ROTATION_DEG:g}°; moving field of view = fixed + {a.get('margin_mm', 110):g} mm per side; "
             f"global search: {a.get('starts')} starts, ±{a.get('range_deg')}°, ±{a.get('range_mm')} mm; "
             f"device {a.get('device')}, {a.get('threads')} threads."]
    if "lc2-local" in a.get("methods", []):
        limit = a.get("lc2_max_evaluations")
        notes.append(f"lc2-local runs only on the first {a.get('lc2_cases_per_bin')} case(s) per pair and bin "
                     "(its counts are in the cells)"
                     + (f", limited to {limit} LC² evaluations" if limit else "") + ".")
    for scope, block in summary.items():
        t = block["targets"]
        parts = []
        for method in DISA_GLOBAL_METHODS:
            key = method.replace("-", "_")
            if t.get(f"{key}_over_sitk_median_time") is not None:
                parts.append(f"{method} / SimpleITK median time {t[f'{key}_over_sitk_median_time']:.2f}× "
                             f"(target ≤ {TARGET_TIME_RATIO:g}×)")
            if t.get(f"{key}_min_bin_success") is not None:
                parts.append(f"{method} lowest bin success {100 * t[f'{key}_min_bin_success']:.0f}% "
                             f"(target ≥ {100 * TARGET_GLOBAL_SUCCESS:.0f}%)")
        if parts:
            notes.append(f"{'all pairs' if scope == 'all' else scope}: " + "; ".join(parts) + ".")
    cost = record.get("evaluation_cost") or {}
    for key in sorted(k for k in cost if k.startswith("threads_")):
        c, r = cost[key], cost[key]["lc2_over_disa"]
        notes.append(f"One similarity evaluation of one pose ({cost['pair']}, {cost['device']}, "
                     f"{key.split('_')[1]} thread(s)): DISA {1e3 * c['disa']['one_pose_s']:.2f} ms "
                     f"({1e3 * c['disa']['one_pose_with_gradient_s']:.2f} ms with gradient, "
                     f"{1e3 * c['disa']['per_pose_in_batch_of_64_s']:.3f} ms per pose in a batch of 64), MIND-SSC "
                     f"{1e3 * c['mind']['one_pose_s']:.2f} ms, direct LC² {1e3 * c['lc2']['one_pose_s']:.1f} ms: "
                     f"LC²/DISA = {r['one_pose']:.0f}× ({r['one_pose_with_gradient']:.0f}× with gradient, "
                     f"{r['per_pose_in_batch_of_64']:.0f}× batched; target ≥ {TARGET_EVALUATION_RATIO:g}×).")
    derived = summary.get("all", {}).get("methods", {})
    per_eval = {m: v.get("median_search_seconds_per_evaluation") for m, v in derived.items()
                if v.get("median_search_seconds_per_evaluation")}
    if per_eval:
        notes.append("Search-stage seconds per evaluation (median over runs, includes gradients and optimiser): "
                     + ", ".join(f"{m} {1e3 * s:.2f} ms" for m, s in per_eval.items())
                     + (f"; lc2-local / disa-local = {per_eval['lc2-local'] / per_eval['disa-local']:.0f}×"
                        if "lc2-local" in per_eval and "disa-local" in per_eval else "") + ".")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)


# -------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default=",".join(ALL_PAIRS), help=f"comma-separated, from {', '.join(ALL_PAIRS)}")
    ap.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma-separated, from {', '.join(ALL_METHODS)}")
    ap.add_argument("--cases-per-bin", type=int, default=None,
                    help="cases per pair and bin (default: ⌈20 / number of pairs⌉, so ≥ 20 per bin over all pairs)")
    ap.add_argument("--lc2-cases-per-bin", type=int, default=2, help="lc2-local runs on the first N cases per pair "
                                                                     "and bin only (it is slow)")
    ap.add_argument("--lc2-max-evaluations", type=int, default=None, help="lc2-rigid's evaluation limit "
                                                                          "(default: the library's)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 case per pair and bin, 1 lc2 case per bin")
    ap.add_argument("--starts", type=int, default=500, help="global search starts (the library default)")
    ap.add_argument("--range-deg", type=float, default=40.0)
    ap.add_argument("--range-mm", type=float, default=150.0)
    ap.add_argument("--margin-mm", type=float, default=110.0, help="moving field of view = fixed + this per side")
    ap.add_argument("--success-mm", type=float, default=2.0)
    ap.add_argument("--points", type=int, default=2000, help="brain/body points of the error")
    ap.add_argument("--disa-raw-descriptors", action="store_true",
                    help="DISA methods use the raw network output, not the sign-symmetric descriptors (the default)")
    ap.add_argument("--disa-precision", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="disa-*: the network passes' arithmetic (the library's default, auto: bfloat16 on a CPU "
                         "that computes it natively, float32 elsewhere; each run's figures say which ran)")
    ap.add_argument("--disa-weights", type=Path, default=None,
                    help="disa-*: a DISA state_dict to measure instead of the shipped `disa` weights "
                         "(its SHA-256 goes into the record)")
    ap.add_argument("--ct-contrast", choices=CT_CONTRASTS, default=CT_CONTRASTS[0],
                    help="the ct pair's second contrast: mr-like (air and lung dark) or arbitrary (any label-driven "
                         "contrast; the records before 2026-12-07)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch and SimpleITK threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, default=None, help="the shared data folder (default ../shared/data)")
    ap.add_argument("--out", type=Path, default=None, help="JSON record, rewritten after every run "
                                                           "(default docs/disa_capture_range_<date>.json)")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --out and do the rest")
    ap.add_argument("--no-evaluation-cost", action="store_true", help="skip the per-evaluation timing")
    ap.add_argument("--system-malloc", action="store_true",
                    help="leave glibc's allocator as it is (by default freed memory is kept for reuse, as the "
                         "deepmmreg program does; DeepMultimodalRegLib/heap_reuse.py)")
    ap.add_argument("--table", type=Path, default=None, help="only print the markdown table of this JSON record")
    args = ap.parse_args(argv)
    args.pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for p in args.pairs:
        if p not in ALL_PAIRS:
            ap.error(f"unknown pair {p!r}; choose from {', '.join(ALL_PAIRS)}")
    for m in args.methods:
        if m not in ALL_METHODS:
            ap.error(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    if args.cases_per_bin is None:
        args.cases_per_bin = 1 if args.quick else math.ceil(20 / max(1, len(args.pairs)))
    if args.quick:
        args.lc2_cases_per_bin = min(args.lc2_cases_per_bin, 1)
    if args.data_dir is None:
        from DeepMultimodalRegLib.training.scans import default_data_dir

        args.data_dir = default_data_dir()
    if args.out is None:
        args.out = REPO / "docs" / f"disa_capture_range_{time.strftime('%Y-%m-%d')}.json"
    return args


def write_json(record: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=float) + "\n")
    os.replace(tmp, path)


#: settings a resumed run must share with the record it continues
_RESUME_KEYS = ("seed", "margin_mm", "starts", "range_deg", "range_mm", "success_mm", "points", "device",
                "disa_weights", "ct_contrast", "disa_precision")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.table:
        record = json.loads(args.table.read_text())
        print(markdown_table(record))
        return record
    import SimpleITK as sitk

    import DeepMultimodalRegLib.disa  # noqa: F401  (registers disa-*, mind-*, lc2-rigid)

    from DeepMultimodalRegLib.heap_reuse import reuse_freed_memory

    # as `deepmmreg` does when run as a program; every method of the run shares the setting
    heap_reuse = False if args.system_malloc else reuse_freed_memory()
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "table"}
    runs: list[dict] = []
    previous = None
    if args.resume and args.out.exists():
        previous = json.loads(args.out.read_text())
        differ = [k for k in _RESUME_KEYS if previous.get("args", {}).get(k) != settings.get(k)]
        if differ:
            raise SystemExit(f"--resume: {args.out} was made with other settings ({', '.join(differ)}); "
                             "use another --out")
        runs = [r for r in previous.get("runs", []) if "error" not in r]  # crashed runs are tried again
        log(f"resuming {args.out}: {len(runs)} runs kept")
    elif args.out.exists() and not args.quick:
        log(f"note: overwriting {args.out} (use --resume to continue it)")
    done = {(r["pair"], r["bin"], r["case"], r["method"]) for r in runs}

    record = {"benchmark": "rigid multimodal capture range: DISA vs MIND-SSC vs LC² vs SimpleITK Mattes MI",
              "status": "running", "args": settings, "machine": machine_info([torch.device(args.device)]),
              "simpleitk": sitk.Version_VersionString(), "bins_mm": [list(b) for b in BINS_MM],
              "case_sampling": f"rotations uniform ±{MAX_ROTATION_DEG:g}° per axis about the fixed centre, translation "
                               f"uniform direction × U[0, {MAX_TRANSLATION_MM:g}] mm, kept when the initial mean "
                               "error over the points falls in the bin",
              "pairs": {}, "cases": [], "runs": runs}
    if previous and "evaluation_cost" in previous:
        record["evaluation_cost"] = previous["evaluation_cost"]
    record["machine"]["simpleitk_threads"] = args.threads
    record["machine"]["heap_reuse"] = heap_reuse
    from DeepMultimodalRegLib.device import native_bfloat16

    # what disa_precision="auto" chooses on this machine (each run's figures say what ran)
    record["machine"]["native_bfloat16"] = native_bfloat16(torch.device(args.device))
    if args.disa_weights:
        import hashlib

        record["disa_weights_sha256"] = hashlib.sha256(Path(args.disa_weights).read_bytes()).hexdigest()
    load = record["machine"].get("load_average_at_start")
    if load and load[0] > 0.5 * (os.cpu_count() or 1):
        log(f"warning: load average {load[0]} on {os.cpu_count()} cores: other work is running, times (and "
            f"the small per-evaluation times above all, with {args.threads} threads) will be inflated")

    started = time.perf_counter()
    pairs: dict[str, Pair] = {}
    cases: dict[str, dict[int, list[dict]]] = {}
    for k, name in enumerate(args.pairs):
        t0 = time.perf_counter()
        pairs[name] = load_pair(name, args.data_dir, args.points, args.seed, args.ct_contrast)
        cases[name] = draw_cases(pairs[name], args.cases_per_bin, args.seed * 1000 + 17 * k + 1)
        record["pairs"][name] = {"description": pairs[name].description, "fixed_grid": list(pairs[name].fixed.shape),
                                 "points": int(pairs[name].points.shape[0])}
        for b, items in cases[name].items():
            for i, c in enumerate(items):
                record["cases"].append({"pair": name, "bin": b, "case": i, "initial_mm": c["initial_mm"],
                                        "truth_deg_mm": [math.degrees(v) for v in c["params"][:3]] + c["params"][3:]})
        log(f"pair {name}: {pairs[name].description} ({time.perf_counter() - t0:.1f} s)")

    def moving_for(name: str, b: int, i: int) -> tuple[Volume, int]:
        seed = args.seed * 100000 + 1000 * ALL_PAIRS.index(name) + 100 * b + i
        truth = truth_of(cases[name][b][i], pairs[name])
        return misaligned_copy(pairs[name].contrast(seed), truth, args.margin_mm, f"{name}_bin{b}_case{i}"), seed

    def save() -> None:
        record["summary"] = summarise(runs, args.pairs, args.methods)
        record["wall_seconds"] = round(time.perf_counter() - started, 1)
        write_json(record, args.out)

    if not args.no_evaluation_cost and "evaluation_cost" not in record:
        first = args.pairs[0]
        moving, _ = moving_for(first, 0, 0)
        record["evaluation_cost"] = evaluation_cost(pairs[first], moving, truth_of(cases[first][0][0], pairs[first]),
                                                    args)
        for key, c in record["evaluation_cost"].items():
            if key.startswith("threads_"):
                log(f"evaluation cost, {key}: DISA {1e3 * c['disa']['one_pose_s']:.2f} ms, MIND "
                    f"{1e3 * c['mind']['one_pose_s']:.2f} ms, LC² {1e3 * c['lc2']['one_pose_s']:.1f} ms → LC²/DISA "
                    f"{c['lc2_over_disa']['one_pose']:.0f}×")
        save()

    # case index outermost: a stopped run has covered every pair and bin evenly
    total = sum(1 for i in range(args.cases_per_bin) for _ in args.pairs for _ in BINS_MM for m in args.methods
                if m != "lc2-local" or i < args.lc2_cases_per_bin)
    count = len(done)
    for i in range(args.cases_per_bin):
        for name in args.pairs:
            for b in range(len(BINS_MM)):
                todo = [m for m in args.methods if (m != "lc2-local" or i < args.lc2_cases_per_bin)
                        and (name, b, i, m) not in done]
                if not todo:
                    continue
                case = cases[name][b][i]
                moving, seed = moving_for(name, b, i)
                for method in todo:
                    r = run_record(method, pairs[name], b, i, case, moving, seed, args)
                    runs.append(r)
                    count += 1
                    outcome = (f"error {r['error_mm']:.2f} mm {'OK' if r['success'] else 'miss'}" if "error_mm" in r
                               else f"CRASHED {r['error']}")
                    log(f"[{count}/{total}] {name} {bin_label(BINS_MM[b])} case {i} (initial {case['initial_mm']:.1f} mm) "
                        f"{method}: {outcome}, {r['seconds']:.1f} s, {r.get('evaluations')} evaluations")
                    save()
    record["status"] = "complete"
    if hasattr(os, "getloadavg"):
        record["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    save()
    log(f"wrote {args.out} ({record['wall_seconds']:.0f} s)")
    print(markdown_table(record))
    return record


if __name__ == "__main__":
    main()
