"""Benchmark of the DISA descriptor network: how well it approximates LC² on scans it was not trained
on, how fast it is, and what 8-bit descriptors cost in accuracy.

    python benchmarks/disa_descriptor.py [--weights out/disa_run1/disa.pt] [--device auto]
        [--anchors 2000] [--sizes 128,256] [--repeats 3] [--json docs/disa_descriptor.json]
    python benchmarks/disa_descriptor.py --weights out/disa_run1/checkpoint.pt --quick   (dry run)
    python benchmarks/disa_descriptor.py --random-init --quick                          (no weights)

Four measurements (``--parts 1,2,3,4`` selects them):

1. **Approximation quality** on patch pairs of the held-out scans (``colin27_t1``, ``pelvis_ct``,
   prepared at 2 mm, z-scored).  Descriptors are computed on the FULL volumes, as registration
   does (descriptor voxel (k, j, i) sits on input voxel (4k, 4j, 4i)).  For each ordered pair
   (A fitted, B regressor), anchors are drawn on A's descriptor grid (≥ 7 voxels from every face)
   with probability ∝ the local variance (radius 7) of the A patch; the DISA target (mean LC² over
   radii 3, 5, 7) of each anchor against every descriptor-grid voxel of B (≥ 7 voxels from every
   face) is computed with ``lc2_of_patches_everywhere``; t ~ U[0, 1] is drawn and the candidate
   whose target is closest to t is the partner (the paper's sampler, also the training sampler).
   Predicted = dot product of the two descriptors.  Reported: MSE (the paper's "L2 error", 0.0083
   on its validation set), Pearson r, pairs, target mean/std, for both cross-scan directions and
   for a same-scan control (A = B, partner at a different place); also the MSE / r over ALL
   candidates of every anchor (the whole similarity maps, dominated by low targets).  The issue's
   bar: MSE ≤ 0.015 and Pearson ≥ 0.9 on the cross-scan pairs.
2. **Descriptor extraction time** of a real scan (the Kirby21 T1 resampled to size³ and z-scored)
   for each ``--sizes`` on the CPU (and CUDA when available): one warm-up, then the best of
   ``--repeats`` wall times under ``torch.no_grad`` (volume already on the device).  Paper: 70 ms
   for 256³ on an RTX 4090.
3. **Time of one similarity evaluation of a 6-DOF pose** on the embedded sample pair (T1 fixed,
   T2 moving, prepared with ``prepare_for_disa``), same pose and fixed grid for every metric:
   DISA float (trilinear resampling of the moving descriptor map onto the fixed descriptor grid,
   4× coarser, and the variance-weighted sum of dot products), DISA int8 (a: nearest-neighbour
   gather of int8 codes + ``int8_dot``; b: dequantise + trilinear resample), volume LC² (resample
   the prepared moving image onto the fixed 2 mm grid + ``volume_lc2(radius=3)``) and MIND-SSC
   (resample the 12-channel moving descriptors + ``mind_ssd``).  Best of ``--repeats`` blocks, each
   block long enough to time reliably; ratios LC²/DISA, MIND/DISA, int8/DISA.  Paper: > 300×
   faster per evaluation than LC².
4. **Accuracy cost of int8** on the same pair with a known rigid offset (``make_demo_pair``):
   (a) relative change of the similarity value (int8 paths vs float) at the identity and at 20
   random poses (±10°, ±10 mm); (b) the optimum of the DISA similarity found by the same Adam
   optimiser (150 iterations) from the identity with float and with int8-dequantised descriptors:
   the difference of the two poses and each one's error against the known offset.

Prints one JSON object on stdout (progress goes to stderr) and writes it to ``--json`` if given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from DeepMultimodalRegLib.demo import make_demo_pair
from DeepMultimodalRegLib.device import resolve_device
from DeepMultimodalRegLib.disa.preprocess import prepare_for_disa
from DeepMultimodalRegLib.evaluation import foreground_points, target_registration_error
from DeepMultimodalRegLib.image.volume import Volume
from DeepMultimodalRegLib.metrics.lc2 import lc2_of_patches_everywhere, volume_lc2
from DeepMultimodalRegLib.metrics.lc2 import DISA_RADII, disa_target
from DeepMultimodalRegLib.metrics.local_stats import local_variance as patch_variance
from DeepMultimodalRegLib.metrics.mind import mind_ssc, mind_ssd
from DeepMultimodalRegLib.networks.disa_net import (DESCRIPTOR_CHANNELS, OUTPUT_STRIDE, DISANet, _adapt_state_dict,
                                                    compute_descriptors, count_parameters, load_disa_network)
from DeepMultimodalRegLib.networks.quantize import dequantize, int8_dot, quantize
from DeepMultimodalRegLib.training.scans import default_data_dir, load_prepared_scans
from DeepMultimodalRegLib.transforms import RigidTransform, resample_tensor
from DeepMultimodalRegLib.transforms.resample import resample

REPO = Path(__file__).resolve().parents[1]
HELD_OUT = ("colin27_t1", "pelvis_ct")
#: anchors and candidates lie at least this many voxels from every face (the largest patch radius)
MARGIN = max(DISA_RADII)
#: radius of the local-variance weight (anchor sampling and the DISA similarity's weights)
WEIGHT_RADIUS = max(DISA_RADII)
SPACING_MM = 2.0
#: the issue's bar on the cross-scan pairs
BAR_MSE = 0.015
BAR_PEARSON = 0.9
#: sampled pairs per direction re-computed by brute force (disa_target) to check the LC²-map indexing
CHECK_PAIRS = 8
PAPER = {"validation_l2_error": 0.0083, "extraction_256_ms_rtx4090": 70, "speedup_vs_lc2_per_evaluation": ">300"}
#: the pose of the timing runs: rx, ry, rz in degrees, tx, ty, tz in mm
TIMING_POSE = (3.0, -2.0, 4.0, 5.0, -3.0, 2.0)


def log(message: str) -> None:
    print(f"[disa_descriptor {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rigid(pose_deg_mm, center, device, dtype=torch.float64) -> RigidTransform:
    rx, ry, rz, tx, ty, tz = (float(v) for v in pose_deg_mm)
    params = torch.tensor([[math.radians(rx), math.radians(ry), math.radians(rz), tx, ty, tz]], dtype=dtype,
                          device=device)
    return RigidTransform(params, torch.as_tensor(np.asarray(center), dtype=dtype, device=device))


# ----------------------------------------------------------------------------------------- setup
def load_model(args) -> tuple[DISANet, dict]:
    """The network to measure and a description of where its weights came from."""
    if args.weights:
        path = Path(args.weights)
        saved = torch.load(path, map_location="cpu", weights_only=True)
        info = {"source": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        if isinstance(saved, dict) and "model" in saved:
            state = saved["model"]
            info["kind"] = "training checkpoint (key 'model')"
            if "state" in saved:
                try:
                    info["training_step"] = json.loads(saved["state"]).get("step")
                    info["training_seconds"] = json.loads(saved["state"]).get("seconds")
                except (TypeError, ValueError):
                    pass
        else:
            state = saved
            info["kind"] = "state_dict"
        model = DISANet()
        model.load_state_dict(_adapt_state_dict(state), strict=True)
    elif args.random_init:
        torch.manual_seed(args.seed)
        model = DISANet()
        info = {"source": "random initialisation (DISANet(), torch seed %d): numbers are meaningless" % args.seed}
    else:
        from DeepMultimodalRegLib.weights.manifest import WeightsError

        try:
            model = load_disa_network("disa")
        except WeightsError as exc:
            print(f"disa_descriptor: {exc}\n  -> pass --weights out/disa_run1/disa.pt (or a checkpoint.pt) "
                  "or --random-init for a dry run", file=sys.stderr)
            raise SystemExit(2)
        info = {"source": "shipped network 'disa' (weights manifest)"}
    info["parameters"] = count_parameters(model)
    return model.eval(), info


def machine_info(devices) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "devices": [str(d) for d in devices]}
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        info["git_commit"] = commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def local_variance(data: torch.Tensor, radius: int = WEIGHT_RADIUS, stride: int = OUTPUT_STRIDE) -> torch.Tensor:
    """The LC² patch weight on the descriptor grid (the library's local variance, radius 7, stride 4)."""
    return patch_variance(data, radius, stride)


def interior_sites(shape, margin: int = MARGIN) -> torch.Tensor:
    """Bool [⌈D/4⌉, ⌈H/4⌉, ⌈W/4⌉]: descriptor voxels whose input voxel 4q is ≥ margin from every face."""
    axes = []
    for n in shape:
        pos = torch.arange(-(-int(n) // OUTPUT_STRIDE)) * OUTPUT_STRIDE
        axes.append((pos >= margin) & (pos <= int(n) - 1 - margin))
    return axes[0][:, None, None] & axes[1][None, :, None] & axes[2][None, None, :]


def timed_best(fn, device: torch.device, repeats: int, min_block_s: float, max_inner: int = 2000) -> dict:
    """Best (and median) seconds per call of ``fn``: one warm-up, then ``repeats`` blocks of ``inner``
    calls each, ``inner`` chosen so a block lasts about ``min_block_s``."""
    fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    single = time.perf_counter() - start
    inner = int(min(max_inner, max(1, math.ceil(min_block_s / max(single, 1e-7)))))
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) / inner)
    return {"best_s": min(times), "median_s": float(np.median(times)), "calls_per_block": inner, "blocks": repeats}


# --------------------------------------------------------------------------- 1. approximation quality
class _Stats:
    """Running sums for MSE and Pearson r of (prediction, target) pairs."""

    def __init__(self):
        self.n = 0
        self.s = np.zeros(6)  # Σp, Σt, Σp², Σt², Σpt, Σ(p−t)²

    def add(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        p, t = pred.double().reshape(-1), target.double().reshape(-1)
        self.n += p.numel()
        self.s += np.array([float(v) for v in (p.sum(), t.sum(), (p * p).sum(), (t * t).sum(), (p * t).sum(),
                                                ((p - t) ** 2).sum())])

    def result(self) -> dict:
        n = max(self.n, 1)
        sp, st, spp, stt, spt, se = self.s
        vp, vt = spp / n - (sp / n) ** 2, stt / n - (st / n) ** 2
        cov = spt / n - sp * st / n ** 2
        r = cov / math.sqrt(vp * vt) if vp > 0 and vt > 0 else float("nan")
        return {"mse": se / n, "pearson": r, "pairs": self.n, "target_mean": st / n,
                "target_std": math.sqrt(max(vt, 0.0)), "prediction_mean": sp / n, "prediction_std": math.sqrt(max(vp, 0.0))}


def pair_metrics(pred: np.ndarray, target: np.ndarray) -> dict:
    out = {"mse": float(np.mean((pred - target) ** 2)),
           "pearson": float(np.corrcoef(pred, target)[0, 1]) if pred.size > 1 and pred.std() > 0 and target.std() > 0
           else float("nan"),
           "pairs": int(pred.size), "target_mean": float(target.mean()), "target_std": float(target.std()),
           "prediction_mean": float(pred.mean()), "prediction_std": float(pred.std())}
    bins = []
    edges = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0 + 1e-9]
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (target >= lo) & (target < hi)
        if sel.any():
            bins.append({"target_from": lo, "pairs": int(sel.sum()),
                         "mse": float(np.mean((pred[sel] - target[sel]) ** 2)), "mean_prediction": float(pred[sel].mean())})
    out["by_target_bin"] = bins
    return out


def descriptor_spread(phi: torch.Tensor, weight: torch.Tensor) -> dict:
    """How many directions the descriptors of a scan use: eigenvalues of their weighted covariance
    (the LC² weights, after removing the weighted mean, as registration does).  A collapsed network
    puts nearly everything in one direction, and a dot product of such descriptors is close to a
    product of two per-patch scalars, which cannot express which patch matches which."""
    x = phi.reshape(phi.shape[0], -1).double()
    w = weight.reshape(-1).double().clamp_min(0)
    mean = (x * w).sum(1, keepdim=True) / w.sum()
    centred = x - mean
    eig = torch.linalg.eigvalsh((centred * w) @ centred.T / w.sum()).flip(0).clamp_min(0)
    energy = (eig.cumsum(0) / eig.sum()).tolist()
    return {"energy_first_1_2_4_8": [round(energy[i], 4) for i in (0, 1, 3, 7)],
            "participation_ratio": float(eig.sum() ** 2 / (eig ** 2).sum()),
            "mean_norm": float((phi.norm(dim=0).reshape(-1).double() * w).sum() / w.sum())}


def _ceiling(target: np.ndarray, reverse: np.ndarray) -> dict:
    """What a symmetric predictor that serves both directions equally would score on these pairs:
    ½(forward + reverse LC²) against the forward targets (this benchmark's scoring), and how well the
    two directions agree.  It shows how far the issue's bar is reachable at all for a dot product."""
    best = pair_metrics(0.5 * (target + reverse), target)
    return {"mse": best["mse"], "pearson": best["pearson"],
            "forward_reverse_pearson": float(np.corrcoef(target, reverse)[0, 1]) if target.size > 1 else float("nan")}


def approximation_pairs(a: Volume, phi_a: torch.Tensor, b: Volume, phi_b: torch.Tensor, anchors: int, seed: int,
                        chunk: int, device: torch.device, same_scan: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                                    _Stats, dict]:
    """Sampled (prediction, target, reverse target) pairs for A fitted from B, and running stats over
    all candidates.  The reverse target is the same pair's LC² with the roles swapped (B fitted from
    A), by brute force: a dot product is symmetric, so where training draws the direction at random
    it can at best learn the mean of the two (see ``symmetric_ceiling``)."""
    g = torch.Generator().manual_seed(seed)
    weight = local_variance(a.data).cpu()
    weight = torch.where(interior_sites(a.shape), weight, torch.zeros_like(weight)).reshape(-1)
    positive = int((weight > 0).sum())
    flat = torch.multinomial(weight.float(), anchors, replacement=positive < anchors, generator=g)
    d, h, w = (int(v) for v in phi_a.shape[1:])
    anchor_sites = torch.stack([flat // (h * w), (flat // w) % h, flat % w], 1)
    anchor_vox = anchor_sites * OUTPUT_STRIDE
    t_draw = torch.rand(anchors, generator=g, dtype=torch.float64)

    candidates = interior_sites(b.shape).reshape(-1).to(device)
    a_data, b_data = a.data.to(device), b.data.to(device)
    phi_a_flat = phi_a.reshape(DESCRIPTOR_CHANNELS, -1)
    phi_b_flat = phi_b.reshape(DESCRIPTOR_CHANNELS, -1)
    preds, targets, partners = [], [], []
    everywhere = _Stats()
    check = None
    for s in range(0, anchors, chunk):
        e = min(anchors, s + chunk)
        maps = [lc2_of_patches_everywhere(a_data, anchor_vox[s:e].to(device), b_data, r, stride=OUTPUT_STRIDE, pad=True)
                for r in DISA_RADII]
        target = torch.stack(maps).mean(0).double().reshape(e - s, -1)  # [K, cells of B's descriptor grid]
        if target.shape[1] != phi_b_flat.shape[1]:
            raise RuntimeError(f"LC² map {target.shape} is not on the descriptor grid {tuple(phi_b.shape)}")
        allowed = candidates[None].expand(e - s, -1).clone()
        if same_scan:  # the partner must be another place than the anchor itself
            allowed[torch.arange(e - s, device=device), flat[s:e].to(device)] = False
        dist = (target - t_draw[s:e, None].to(device)).abs().masked_fill(~allowed, float("inf"))
        pick = dist.argmin(1)
        rows = torch.arange(e - s, device=device)
        anchor_desc = phi_a_flat[:, flat[s:e].to(device)].T.double()  # [K, 16]
        pred_all = anchor_desc @ phi_b_flat.double()  # [K, cells]
        preds.append(pred_all[rows, pick].cpu())
        targets.append(target[rows, pick].cpu())
        hb, wb = phi_b.shape[2], phi_b.shape[3]
        partners.append(torch.stack([pick // (hb * wb), (pick // wb) % hb, pick % wb], 1).cpu() * OUTPUT_STRIDE)
        everywhere.add(pred_all[allowed], target[allowed])
        if check is None:  # oracle: the brute-force patch LC² (disa_target) of the first picked pairs
            m = min(CHECK_PAIRS, e - s)
            hb, wb = phi_b.shape[2], phi_b.shape[3]
            partner_vox = torch.stack([pick[:m] // (hb * wb), (pick[:m] // wb) % hb, pick[:m] % wb], 1) * OUTPUT_STRIDE
            brute = disa_target(a_data, b_data, anchor_vox[s:s + m].to(device), partner_vox)
            check = float((brute.double() - target[rows[:m], pick[:m]]).abs().max())
    detail = {"target_check_vs_disa_target_max_abs": check,"anchor_sites_with_positive_weight": positive, "candidate_sites": int(candidates.sum()),
              "fitted_shape": list(a.shape), "regressor_shape": list(b.shape)}
    reverse = disa_target(b_data, a_data, torch.cat(partners).to(device), anchor_vox.to(device))
    return torch.cat(preds).numpy(), torch.cat(targets).numpy(), reverse.double().cpu().numpy(), everywhere, detail


def teacher_map(path: str, scan: Volume) -> torch.Tensor:
    """A training teacher's descriptor map of a scan (``train disa --distil-steps``; ``teacher.pt`` of a run)."""
    from DeepMultimodalRegLib.training.disa_teacher import LandmarkTeacher

    teacher = LandmarkTeacher.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return teacher.embed_volume(scan.data)


def measure_approximation(model, args, device) -> dict:
    log("part 1: preparing the held-out scans (cache: out/bench_cache)")
    scans = load_prepared_scans(args.data_dir, "validation", SPACING_MM, cache_dir=REPO / "out" / "bench_cache")
    missing = [n for n in HELD_OUT if n not in scans]
    if missing:
        raise RuntimeError(f"held-out scans missing: {missing}")
    desc, extraction = {}, {}
    for name in HELD_OUT:
        start = time.perf_counter()
        if args.teacher:  # the distillation teacher's own map: what a network distilled from it aims at
            desc[name] = teacher_map(args.teacher, scans[name]).to(device)
        else:
            desc[name], _ = compute_descriptors(model, scans[name], device, sign_symmetric=args.sign_symmetric)
        sync(device)
        extraction[name] = {"shape": list(scans[name].shape), "descriptor_shape": list(desc[name].shape[1:]),
                            "seconds": round(time.perf_counter() - start, 3),
                            "spread": descriptor_spread(desc[name], local_variance(scans[name].data).to(desc[name]))}
        log(f"part 1: descriptors of {name} {tuple(scans[name].shape)} in {extraction[name]['seconds']} s")
    total = args.anchors
    per_direction = max(1, total // 2)
    runs = [(HELD_OUT[0], HELD_OUT[1], per_direction, False), (HELD_OUT[1], HELD_OUT[0], total - per_direction, False)]
    if not args.no_control:
        per_scan = max(1, total // 4)
        runs += [(HELD_OUT[0], HELD_OUT[0], per_scan, True), (HELD_OUT[1], HELD_OUT[1], per_scan, True)]
    result = {"scans": extraction, "radii": list(DISA_RADII), "margin_voxels": MARGIN, "spacing_mm": SPACING_MM,
              "anchor_weight": f"local variance of the fitted patch, radius {WEIGHT_RADIUS}",
              "partner_rule": "t ~ U[0,1], candidate with the closest target (paper's sampler)",
              "directions": {}}
    pooled = {False: ([], [], _Stats()), True: ([], [], _Stats())}
    reverses: dict[bool, list] = {}
    for index, (a_name, b_name, n, same) in enumerate(runs):
        start = time.perf_counter()
        pred, target, reverse, everywhere, detail = approximation_pairs(
            scans[a_name], desc[a_name], scans[b_name], desc[b_name], n, args.seed * 1000 + index, args.chunk, device, same)
        key = f"{a_name}_from_{b_name}" + (" (same-scan control)" if same else "")
        result["directions"][key] = {**pair_metrics(pred, target), "all_candidates": everywhere.result(), **detail,
                                     "symmetric_ceiling": _ceiling(target, reverse),
                                     "seconds": round(time.perf_counter() - start, 2)}
        log(f"part 1: {key}: {n} anchors, mse {result['directions'][key]['mse']:.4f}, "
            f"r {result['directions'][key]['pearson']:.3f} ({result['directions'][key]['seconds']} s)")
        p, t, st = pooled[same]
        p.append(pred)
        t.append(target)
        reverses.setdefault(same, []).append(reverse)
        st.n += everywhere.n
        st.s += everywhere.s
    cross_p, cross_t, cross_all = pooled[False]
    cross = pair_metrics(np.concatenate(cross_p), np.concatenate(cross_t))
    cross["all_candidates"] = cross_all.result()
    cross["symmetric_ceiling"] = _ceiling(np.concatenate(cross_t), np.concatenate(reverses[False]))
    result["cross_scan"] = cross
    if not args.no_control:
        cp, ct, call = pooled[True]
        result["same_scan_control"] = {**pair_metrics(np.concatenate(cp), np.concatenate(ct)),
                                       "all_candidates": call.result()}
    result["bar"] = {"mse_max": BAR_MSE, "pearson_min": BAR_PEARSON,
                     "mse_pass": bool(cross["mse"] <= BAR_MSE),
                     "pearson_pass": bool(cross["pearson"] >= BAR_PEARSON),
                     "paper_validation_l2_error": PAPER["validation_l2_error"]}
    result["bar"]["pass"] = result["bar"]["mse_pass"] and result["bar"]["pearson_pass"]
    return result


# ----------------------------------------------------------------------------------- 2. extraction time
def scan_cube(size: int, data_dir: Path) -> Volume:
    """The real Kirby21 T1 resampled to a size³ grid covering its field of view (the same cube as the
    resampling benchmark), z-scored."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_batched_resampling import load_cube

    volume = load_cube(size, Path(data_dir))
    z = volume.data
    return volume.with_data((z - z.mean()) / z.std().clamp_min(1e-6))


def measure_extraction(model, args, devices) -> dict:
    out = {"volume": "Kirby21 T1 (mr_kirby21_113/t1_mprage) resampled to size³ over its field of view, z-scored",
           "timing": "compute_descriptors under torch.no_grad, volume already on the device; 1 warm-up, best of repeats",
           "repeats": args.repeats, "runs": []}
    for size in args.sizes:
        cube = scan_cube(size, args.data_dir)
        for device in devices:
            model.to(device)
            vol = cube.to(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for i in range(args.repeats + 1):
                sync(device)
                start = time.perf_counter()
                with torch.no_grad():
                    phi, _ = compute_descriptors(model, vol, device)
                sync(device)
                times.append(time.perf_counter() - start)
            entry = {"size": size, "device": str(device), "descriptor_shape": list(phi.shape),
                     "threads": torch.get_num_threads() if device.type == "cpu" else None,
                     "warmup_s": round(times[0], 4), "best_s": round(min(times[1:]), 4),
                     "median_s": round(float(np.median(times[1:])), 4), "all_s": [round(t, 4) for t in times[1:]]}
            if device.type == "cuda":
                entry["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 1024 ** 3, 3)
            out["runs"].append(entry)
            log(f"part 2: {size}³ on {device}: best {entry['best_s']} s")
            del phi, vol
        del cube
    model.to("cpu")
    return out


# ------------------------------------------------------------------------ 3./4. similarity of a pose
def demo_pair(offset):
    """Fixed T1 and moving T2 (moved by the known offset), both prepared as DISA expects, and the offset."""
    fixed_raw, moving_raw, truth = make_demo_pair(offset)
    fixed = prepare_for_disa(fixed_raw, SPACING_MM, "MR")
    moving = prepare_for_disa(moving_raw, SPACING_MM, "MR")
    return fixed, moving, truth


class DisaSimilarity:
    """The DISA similarity of a rigid pose, Σ w(p)⟨φF[p], φM∘T[p]⟩ / Σ w on the fixed descriptor grid,
    in the float and int8 variants.  w = local variance (radius 7) of the prepared fixed image."""

    def __init__(self, model, fixed: Volume, moving: Volume, device: torch.device):
        self.device = device
        self.phi_f, self.grid_f = compute_descriptors(model, fixed.to(device), device)
        self.phi_m, self.grid_m = compute_descriptors(model, moving.to(device), device)
        self.weight = local_variance(fixed.data.to(device)).float()
        self.weight_sum = self.weight.double().sum()
        self.center = torch.as_tensor(np.asarray(fixed.geometry.center), dtype=torch.float64, device=device)
        # int8 codes (per-volume scale) and their dequantised floats
        self.q_f, self.s_f = quantize(self.phi_f)
        self.q_m, self.s_m = quantize(self.phi_m)
        self.deq_f = dequantize(self.q_f, self.s_f)
        self.deq_m = dequantize(self.q_m, self.s_m)
        # nearest-neighbour gather of int8 codes: channels-last table with a zero row for "outside"
        c = DESCRIPTOR_CHANNELS
        self.table = torch.cat([self.q_m.reshape(c, -1).T, torch.zeros(1, c, dtype=torch.int8, device=device)]).contiguous()
        d, h, w = self.grid_f.shape
        k, j, i = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
        self.fixed_index = torch.stack([i, j, k], -1).reshape(-1, 3).to(device=device, dtype=torch.float32)
        self.to_moving_index = torch.as_tensor(self.grid_m.physical_to_index_matrix(), dtype=torch.float64, device=device)
        self.from_fixed_index = torch.as_tensor(self.grid_f.index_to_physical_matrix(), dtype=torch.float64, device=device)
        self.moving_size = torch.as_tensor(self.grid_m.size_xyz, dtype=torch.float32, device=device)

    def transform(self, params: torch.Tensor) -> RigidTransform:
        return RigidTransform(params.reshape(1, 6), self.center)

    def _weighted(self, phi_f: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        return (self.weight * (phi_f * warped).sum(0)).sum(dtype=torch.float64) / self.weight_sum

    def float_value(self, t: RigidTransform, phi_f=None, phi_m=None, interpolation: str = "linear") -> torch.Tensor:
        phi_f = self.phi_f if phi_f is None else phi_f
        phi_m = self.phi_m if phi_m is None else phi_m
        warped = resample_tensor(phi_m, self.grid_m, t, self.grid_f, interpolation=interpolation)[0]
        return self._weighted(phi_f, warped)

    def int8_nearest_value(self, t: RigidTransform) -> torch.Tensor:
        """(a) gather the int8 codes of the nearest moving descriptor voxel, then int8_dot."""
        m = (self.to_moving_index @ t.homogeneous()[0].to(self.to_moving_index) @ self.from_fixed_index).float()
        cont = torch.addmm(m[:3, 3], self.fixed_index, m[:3, :3].T)  # [n, 3] continuous (i, j, k)
        inside = ((cont >= -0.5) & (cont < self.moving_size - 0.5)).all(1)
        idx = torch.round(cont).long()
        size = self.grid_m.size_xyz
        lin = (idx[:, 2].clamp(0, size[2] - 1) * size[1] + idx[:, 1].clamp(0, size[1] - 1)) * size[0] \
            + idx[:, 0].clamp(0, size[0] - 1)
        lin = torch.where(inside, lin, torch.full_like(lin, self.table.shape[0] - 1))
        gathered = self.table.index_select(0, lin).T.reshape(self.q_f.shape)  # [16, d, h, w] view
        return int8_dot(self.q_f, self.s_f, gathered, self.s_m, weights=self.weight) / self.weight_sum

    def int8_dequantise_value(self, t: RigidTransform) -> torch.Tensor:
        """(b) dequantise the moving codes, trilinear resample, float weighted dot (fixed dequantised once)."""
        return self.float_value(t, self.deq_f, dequantize(self.q_m, self.s_m))


def measure_evaluation_time(model, args, device, fixed, moving) -> dict:
    log(f"part 3: pose-evaluation timing on {device}")
    model.to(device)
    sim = DisaSimilarity(model, fixed, moving, device)
    t = rigid(TIMING_POSE, fixed.geometry.center, device)
    f_data = fixed.data.to(device)
    m_vol = moving.to(device)
    background = float(moving.data.min())
    mind_f = mind_ssc(f_data)
    mind_m = mind_ssc(m_vol.data)[0]
    params = t.parameters.detach().clone()

    def disa_float():
        return sim.float_value(t)

    def disa_float_grad():
        with torch.enable_grad():
            p = params.clone().requires_grad_(True)
            sim.float_value(sim.transform(p)).backward()
            return p.grad

    def lc2():
        warped = resample(m_vol, t, fixed.geometry, default_value=background)[0]
        return volume_lc2(f_data, warped, radius=3)

    def mind():
        warped = resample_tensor(mind_m, moving.geometry, t, fixed.geometry)
        return mind_ssd(mind_f, warped)

    cases = {"disa_float": disa_float, "disa_int8_nearest_gather": lambda: sim.int8_nearest_value(t),
             "disa_int8_dequantise_resample": lambda: sim.int8_dequantise_value(t),
             "disa_float_nearest_resample": lambda: sim.float_value(t, interpolation="nearest"),
             "disa_float_value_and_gradient": disa_float_grad, "lc2_volume_r3": lc2, "mind_ssc_ssd": mind}
    times = {}
    with torch.no_grad():
        for name, fn in cases.items():
            times[name] = timed_best(fn, device, args.repeats, args.min_block_s)
            log(f"part 3: {name}: {times[name]['best_s'] * 1e3:.3f} ms")
    base = times["disa_float"]["best_s"]
    ratio = lambda k: round(times[k]["best_s"] / base, 2)  # noqa: E731
    nearest, deq = times["disa_int8_nearest_gather"]["best_s"], times["disa_int8_dequantise_resample"]["best_s"]
    recommendation = (
        "float descriptors with trilinear resampling for the gradient-based optimiser (nearest-neighbour "
        "gather is piecewise constant in the pose: zero gradient); int8 codes are worth keeping only as storage "
        "and for gradient-free exhaustive search, where the nearest-neighbour int8 path is "
        + ("faster" if nearest < base else "not faster") + f" than float here ({nearest / base:.2f}× the float time); "
        + f"dequantise-and-resample took {deq / base:.2f}× the float time, but it is the float path plus a "
        "dequantisation, so an engine that wants trilinear resampling should dequantise once per registration "
        "(4× the memory of the codes, still tiny), not per evaluation")
    return {"device": str(device), "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "pose_deg_mm": list(TIMING_POSE),
            "grids": {"fixed_image": list(fixed.shape), "fixed_image_spacing_mm": list(fixed.geometry.spacing),
                      "disa_descriptor_grid": list(sim.grid_f.shape), "disa_descriptor_spacing_mm": list(sim.grid_f.spacing),
                      "disa_channels": DESCRIPTOR_CHANNELS, "lc2_grid": list(fixed.shape), "mind_grid": list(fixed.shape),
                      "mind_channels": int(mind_m.shape[0])},
            "what_is_timed": {
                "disa_float": "trilinear resample of the 16-channel moving descriptor map onto the fixed descriptor "
                              "grid + variance-weighted sum of dot products (descriptors precomputed)",
                "disa_int8_nearest_gather": "index map of the pose, nearest-neighbour gather of int8 codes, int8_dot",
                "disa_int8_dequantise_resample": "dequantise the moving codes, trilinear resample, float weighted dot",
                "disa_float_nearest_resample": "as disa_float with nearest-neighbour resampling (reference)",
                "disa_float_value_and_gradient": "disa_float plus backward to the 6 pose parameters",
                "lc2_volume_r3": "trilinear resample of the prepared moving image onto the fixed 2 mm grid + "
                                 "volume_lc2(radius=3)",
                "mind_ssc_ssd": "trilinear resample of the 12-channel moving MIND-SSC map + mind_ssd (MIND precomputed)"},
            "seconds": times,
            "ratios": {"lc2_over_disa": ratio("lc2_volume_r3"), "mind_over_disa": ratio("mind_ssc_ssd"),
                       "disa_int8_nearest_over_disa": ratio("disa_int8_nearest_gather"),
                       "disa_int8_dequantise_over_disa": ratio("disa_int8_dequantise_resample"),
                       "disa_with_gradient_over_disa": ratio("disa_float_value_and_gradient"),
                       "paper_lc2_over_disa": PAPER["speedup_vs_lc2_per_evaluation"]},
            "recommendation_for_engine": recommendation}


def rotation_angle_deg(r1: torch.Tensor, r2: torch.Tensor) -> float:
    c = ((torch.trace(r1.T @ r2) - 1) / 2).clamp(-1.0, 1.0)
    return math.degrees(math.acos(float(c)))


def pose_difference(a: RigidTransform, b: RigidTransform) -> dict:
    """Rotation between two rigid transforms about the same centre (degrees) and translation difference (mm)."""
    a, b = a.to("cpu", torch.float64), b.to("cpu", torch.float64)
    return {"rotation_deg": rotation_angle_deg(a.matrix[0], b.matrix[0]),
            "translation_mm": float(torch.linalg.norm(a.translation[0] - b.translation[0]))}


def optimise(sim: DisaSimilarity, phi_f, phi_m, iterations: int, lr_rad: float, lr_mm: float) -> tuple[torch.Tensor, list]:
    """Maximise the DISA similarity over the 6 rigid parameters with Adam from the identity.

    Parameters are scaled so one Adam unit is ``lr_rad`` radians / ``lr_mm`` mm; the step size decays
    with a cosine schedule to 2 % so the end point is converged rather than oscillating."""
    scale = torch.tensor([lr_rad] * 3 + [lr_mm] * 3, dtype=torch.float64, device=sim.device)
    x = torch.zeros(6, dtype=torch.float64, device=sim.device, requires_grad=True)
    opt = torch.optim.Adam([x], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iterations, eta_min=0.02)
    trace = []
    with torch.enable_grad():
        for it in range(iterations):
            value = sim.float_value(sim.transform(x * scale), phi_f, phi_m)
            opt.zero_grad()
            (-value).backward()
            opt.step()
            sched.step()
            if it % max(1, iterations // 10) == 0 or it == iterations - 1:
                trace.append(round(float(value.detach()), 6))
    return (x.detach() * scale), trace


def measure_int8_accuracy(model, args, device, fixed, moving, truth) -> dict:
    log(f"part 4: int8 accuracy on {device}")
    model.to(device)
    sim = DisaSimilarity(model, fixed, moving, device)
    g = torch.Generator().manual_seed(args.seed + 4)
    poses = [(0.0,) * 6]
    for _ in range(args.poses):
        angles = (torch.rand(3, generator=g, dtype=torch.float64) * 2 - 1) * 10.0
        shifts = (torch.rand(3, generator=g, dtype=torch.float64) * 2 - 1) * 10.0
        poses.append(tuple(float(v) for v in torch.cat([angles, shifts])))
    rows = []
    with torch.no_grad():
        at_start = float(sim.float_value(RigidTransform.identity(center=fixed.geometry.center, device=device)))
        at_truth = float(sim.float_value(truth.to(device, torch.float64)))
        for pose in poses:
            t = rigid(pose, fixed.geometry.center, device)
            rows.append({"pose_deg_mm": [round(v, 3) for v in pose],
                         "float": float(sim.float_value(t)),
                         "float_nearest": float(sim.float_value(t, interpolation="nearest")),
                         "int8_nearest_gather": float(sim.int8_nearest_value(t)),
                         "int8_dequantise_resample": float(sim.int8_dequantise_value(t))})

    def rel(key: str, ref: str = "float") -> dict:
        d = np.array([abs(r[key] - r[ref]) / max(abs(r[ref]), 1e-12) for r in rows])
        a = np.array([abs(r[key] - r[ref]) for r in rows])
        return {"max_relative": float(d.max()), "mean_relative": float(d.mean()), "max_absolute": float(a.max()),
                "mean_absolute": float(a.mean())}

    values = {"poses": len(rows), "pose_range": "identity + uniform ±10° per angle, ±10 mm per axis",
              "scales": {"fixed": sim.s_f, "moving": sim.s_m},
              "int8_dequantise_resample_vs_float": rel("int8_dequantise_resample"),
              "int8_nearest_gather_vs_float": rel("int8_nearest_gather"),
              "int8_nearest_gather_vs_float_nearest": rel("int8_nearest_gather", "float_nearest"),
              "float_nearest_vs_float": rel("float_nearest"), "values": rows}

    log(f"part 4: optimising ({args.iterations} Adam iterations, float and int8-dequantised)")
    start = time.perf_counter()
    p_float, trace_float = optimise(sim, sim.phi_f, sim.phi_m, args.iterations, args.lr_rad, args.lr_mm)
    p_int8, trace_int8 = optimise(sim, sim.deq_f, sim.deq_m, args.iterations, args.lr_rad, args.lr_mm)
    seconds = time.perf_counter() - start
    center = fixed.geometry.center
    est_float = RigidTransform(p_float.cpu()[None], torch.as_tensor(np.asarray(center)))
    est_int8 = RigidTransform(p_int8.cpu()[None], torch.as_tensor(np.asarray(center)))
    identity = RigidTransform.identity(center=center)
    points = foreground_points(fixed, count=5000, seed=args.seed)

    def as_pose(p: torch.Tensor) -> list:
        p = p.cpu().double()
        return [round(math.degrees(float(v)), 4) for v in p[:3]] + [round(float(v), 4) for v in p[3:]]

    optimum = {"optimiser": f"Adam on the 6 rigid parameters, {args.iterations} iterations, step {args.lr_rad} rad / "
                            f"{args.lr_mm} mm per unit, cosine decay to 2 %, start at the identity",
               "known_offset_deg_mm": list(args.offset),
               "similarity_float_at_start": at_start, "similarity_float_at_known_offset": at_truth,
               "initial_error": {**pose_difference(identity, truth),
                                 "tre": target_registration_error(identity, truth, points)},
               "float": {"pose_deg_mm": as_pose(p_float), "similarity_trace": trace_float,
                         "error": {**pose_difference(est_float, truth),
                                   "tre": target_registration_error(est_float, truth, points)}},
               "int8_dequantised": {"pose_deg_mm": as_pose(p_int8), "similarity_trace": trace_int8,
                                    "error": {**pose_difference(est_int8, truth),
                                              "tre": target_registration_error(est_int8, truth, points)}},
               "float_vs_int8": {**pose_difference(est_float, est_int8),
                                 "tre": target_registration_error(est_int8, est_float, points)},
               "seconds_both": round(seconds, 2)}
    return {"device": str(device), "similarity_values": values, "optimum": optimum}


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", help="state_dict file (or training checkpoint with key 'model') instead of the "
                                      "shipped network, e.g. out/disa_run1/disa.pt")
    ap.add_argument("--teacher", help="part 1 only: measure a training teacher (teacher.pt of a `train disa "
                    "--distil-steps` run) instead of a network")
    ap.add_argument("--sign-symmetric", action="store_true",
                    help="part 1: score ½(φ(x) + φ(−x)), the descriptors the registration engine uses, instead of "
                         "the plain network output")
    ap.add_argument("--random-init", action="store_true", help="measure a randomly initialised DISANet (dry runs)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (parts 1, 3, 4; part 2 times the CPU and "
                                                     "CUDA when usable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny dry run: 100 anchors, 64³ extraction, 1 repeat, "
                                                         "5 poses, 30 iterations")
    ap.add_argument("--parts", default="1,2,3,4", help="which measurements to run, e.g. 1,3")
    ap.add_argument("--anchors", type=int, default=None, help="cross-scan anchors in total (default 2000; "
                                                              "the same-scan control uses half as many)")
    ap.add_argument("--no-control", action="store_true", help="skip the same-scan control of part 1")
    ap.add_argument("--chunk", type=int, default=128, help="anchors per LC²-map batch (memory bound)")
    ap.add_argument("--sizes", default=None, help="cube sizes of part 2 (default 128,256)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3)")
    ap.add_argument("--poses", type=int, default=None, help="random poses of part 4a (default 20)")
    ap.add_argument("--iterations", type=int, default=None, help="Adam iterations of part 4b (default 150)")
    ap.add_argument("--lr-rad", type=float, default=0.01)
    ap.add_argument("--lr-mm", type=float, default=0.5)
    ap.add_argument("--offset", default="6,-4,3,8,-5,4",
                    help="known rigid offset of the moving T2: rx,ry,rz in degrees, tx,ty,tz in mm")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--data-dir", type=Path, default=None, help="the shared data folder (default ../shared/data)")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON result here")
    args = ap.parse_args(argv)
    q = args.quick
    args.anchors = args.anchors if args.anchors is not None else (100 if q else 2000)
    args.sizes = [int(s) for s in (args.sizes or ("64" if q else "128,256")).split(",")]
    args.repeats = args.repeats if args.repeats is not None else (1 if q else 3)
    args.poses = args.poses if args.poses is not None else (5 if q else 20)
    args.iterations = args.iterations if args.iterations is not None else (30 if q else 150)
    args.min_block_s = 0.02 if q else 0.25
    args.parts = {int(p) for p in args.parts.split(",") if p.strip()}
    args.offset = tuple(float(v) for v in args.offset.split(","))
    if len(args.offset) != 6:
        ap.error("--offset needs 6 numbers: rx,ry,rz (degrees), tx,ty,tz (mm)")
    args.data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, weights = load_model(args)
    extraction_devices = [torch.device("cpu")]
    if torch.cuda.is_available() and args.device != "cpu":
        extraction_devices.append(torch.device("cuda"))
    started = time.perf_counter()
    result = {"benchmark": "DISA descriptor: LC² approximation, speed, int8", "quick": args.quick, "seed": args.seed,
              "device": str(device), "weights": weights, "machine": machine_info(sorted({device, *extraction_devices}, key=str)),
              "paper": PAPER}
    timings = {}
    if 1 in args.parts:
        t0 = time.perf_counter()
        result["approximation"] = measure_approximation(model, args, device)
        result["approximation"]["descriptors"] = ("sign-symmetric ½(φ(x) + φ(−x)), as registration uses them"
                                                  if args.sign_symmetric else "plain network output φ(x)")
        timings["approximation"] = round(time.perf_counter() - t0, 1)
    if 2 in args.parts:
        t0 = time.perf_counter()
        result["extraction"] = measure_extraction(model, args, extraction_devices)
        timings["extraction"] = round(time.perf_counter() - t0, 1)
    if 3 in args.parts or 4 in args.parts:
        fixed, moving, truth = demo_pair(args.offset)
        result["pair"] = {"fixed": "sample mr_brain_t1, prepare_for_disa", "moving": "sample mr_brain_t2 moved by the "
                          "inverse of the known offset (make_demo_pair), prepare_for_disa", "offset_deg_mm": list(args.offset)}
        if 3 in args.parts:
            t0 = time.perf_counter()
            result["evaluation_time"] = measure_evaluation_time(model, args, device, fixed, moving)
            timings["evaluation_time"] = round(time.perf_counter() - t0, 1)
        if 4 in args.parts:
            t0 = time.perf_counter()
            result["int8_accuracy"] = measure_int8_accuracy(model, args, device, fixed, moving, truth)
            timings["int8_accuracy"] = round(time.perf_counter() - t0, 1)
    timings["total"] = round(time.perf_counter() - started, 1)
    result["wall_seconds"] = timings
    if hasattr(os, "getloadavg"):
        result["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, args.json)
    return result


if __name__ == "__main__":
    main()
