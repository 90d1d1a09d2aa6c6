"""The demo: a known misalignment of the embedded co-registered brain MR pair, registered by every
available method and by the classical peer, with accuracy measured against the known transform.

The T2 scan is moved by a known rigid transform, so the answer is known exactly; each method
registers the T1 (fixed) with the moved T2 (moving), and the target registration error (TRE) over
brain voxels says how close it came.  Output: one folder per method (transform, warped volume,
report.json, report.png), ``summary.json`` and ``index.html`` linking them.

With ``deep=True`` the demo also runs the interactive deep workflow (general → ISO → RSO in a box
ISO leaves misaligned) on the embedded chest CT with a known deformation
(:func:`DeepMultimodalRegLib.rso.demo.run_deep_demo`), into ``deep_interactive/``; it takes a few
minutes on a CPU, so it is asked for rather than run by default.
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch

from .errors import DeepMMRegError
from .evaluation import foreground_points, misaligned_copy, target_registration_error
from .fileio import atomic_output, check_output_dir
from .image.io import write_volume
from .methods.registry import RegistrationOptions, available_methods, get_method
from .progress import ProgressScope
from .sample_data import load_sample
from .transforms.itk_io import write_transform
from .transforms.linear import RigidTransform

#: the known misalignment: rotations in degrees, translations in mm (a typical head repositioning)
DEMO_MISALIGNMENT = (8.0, -5.0, 6.0, 6.0, -8.0, 5.0)


#: what the demo runs by default: fast enough for a first look on a laptop CPU (lc2-rigid, the
#: global searches and the deformable methods can be asked for with ``methods``)
DEMO_METHODS = ("disa-rigid", "disa-affine", "mind-rigid")
#: where the interactive deep workflow's results go inside the demo's output folder
DEEP_FOLDER = "deep_interactive"


def make_demo_pair(misalignment=DEMO_MISALIGNMENT):
    """Fixed T1, moving T2 moved by a known rigid transform, and that transform (fixed → moving)."""
    fixed = load_sample("mr_brain_t1").float()
    t2 = load_sample("mr_brain_t2").float()
    rx, ry, rz, tx, ty, tz = misalignment
    params = torch.tensor([math.radians(rx), math.radians(ry), math.radians(rz), tx, ty, tz], dtype=torch.float64)
    truth = RigidTransform(params, torch.as_tensor(fixed.geometry.center))
    moving = misaligned_copy(t2, truth, name="mr_brain_t2_moved")
    return fixed, moving, truth


def run_demo(out_dir: str | Path, device: str = "auto", seed: int = 0,
             progress: Callable[[float, str], None] | None = None, methods: list[str] | None = None,
             deep: bool = False, deep_iterations: tuple[int, int] = (100, 400)) -> dict:
    out = check_output_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scope = ProgressScope(progress)
    deep_scope = None
    if deep:  # the interactive workflow dominates the run time: give it most of the progress bar
        scope, deep_scope = scope.sub(0.0, 0.3), scope.sub(0.3, 1.0)
    fixed, moving, truth = make_demo_pair()
    write_volume(fixed, out / "fixed_t1.nii.gz")
    write_volume(moving, out / "moving_t2.nii.gz")
    write_transform(truth, out / "ground_truth.tfm")
    points = foreground_points(fixed, count=5000, seed=seed)
    identity = RigidTransform.identity(center=fixed.geometry.center)
    entries = [{"method": "none (initial misalignment)", "tre": target_registration_error(identity, truth, points),
                "seconds": 0.0, "folder": None}]

    names = [m for m in DEMO_METHODS if m in available_methods()] if methods is None else methods
    runs: list[tuple[str, Callable]] = [(n, _registry_runner(n, device, seed)) for n in names]
    runs.append(("simpleitk-rigid-mattes (peer)", _peer_runner(seed)))
    for i, (name, run) in enumerate(runs):
        stage = scope.sub(i / len(runs), (i + 1) / len(runs))
        stage(0.0, name)
        started = time.perf_counter()
        try:
            result = run(fixed, moving, stage)
        except DeepMMRegError as exc:
            entries.append({"method": name, "error": str(exc)})
            continue
        folder = out / name.split(" ")[0]
        result.figures["tre_mm"] = target_registration_error(result.transform, truth, points)
        result.save(folder)
        entries.append({"method": name, "tre": result.figures["tre_mm"], "folder": folder.name,
                        "seconds": round(time.perf_counter() - started, 2), "device": result.device})
    summary = {"pair": {"fixed": fixed.name, "moving": moving.name,
                        "misalignment_deg_mm": list(DEMO_MISALIGNMENT)},
               "results": entries, "similarity_map": _similarity_map(fixed, moving, truth, out, device)}
    if deep_scope is not None:
        summary["deep_interactive"] = _deep_interactive(out, device, seed, deep_iterations, deep_scope)
    with atomic_output(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    _write_index(out, summary)
    scope(1.0, "done")
    return summary


def _similarity_map(fixed, moving, truth, out: Path, device: str) -> dict | None:
    """The DISA / LC² / MIND-SSC similarity of the fixed image's centre to every point of the moving
    image (paper Fig. 1), and how far each map's maximum lies from the known corresponding point."""
    from .disa.similarity_map import map_agreement, similarity_maps, write_similarity_map_png
    from .networks import load_disa_network
    from .weights.manifest import WeightsError

    try:
        model = load_disa_network()
    except WeightsError as exc:
        return {"skipped": str(exc)}
    point = torch.as_tensor(fixed.geometry.center, dtype=torch.float64)
    maps = similarity_maps(fixed, moving, point.tolist(), model=model, device=device)
    expected = truth.transform_points(point[None])[0, 0]
    distances = {name: float(torch.linalg.norm(torch.as_tensor(location, dtype=torch.float64) - expected))
                 for name, location in maps.maxima.items()}
    write_similarity_map_png(maps, out / "similarity_map.png",
                             title="Similarity of the T1's centre to every point of the moved T2")
    return {"file": "similarity_map.png", "max_distance_to_true_point_mm": distances,
            "agreement": map_agreement(maps)}


def _deep_interactive(out: Path, device: str, seed: int, iterations: tuple[int, int], progress) -> dict:
    """general → ISO → RSO on the chest CT pair with a known deformation (issue 5's workflow)."""
    from .rso.demo import run_deep_demo

    try:
        summary = run_deep_demo(out / DEEP_FOLDER, iso_iterations=iterations[0], rso_iterations=iterations[1],
                                device=device, seed=seed, progress=progress)
    except DeepMMRegError as exc:
        return {"error": str(exc)}
    return {**summary, "folder": DEEP_FOLDER}


def _registry_runner(name: str, device: str, seed: int):
    def run(fixed, moving, progress):
        info = get_method(name)
        return info.runner(fixed, moving, RegistrationOptions(device=device, seed=seed, progress=progress))
    return run


def _peer_runner(seed: int):
    def run(fixed, moving, progress):
        from .peers.simpleitk_rigid import register_rigid_mattes
        return register_rigid_mattes(fixed, moving, seed=seed, progress=progress)
    return run


def _write_index(out: Path, summary: dict) -> None:
    rows = []
    for e in summary["results"]:
        if "error" in e:
            rows.append(f"<tr><td>{html.escape(e['method'])}</td><td colspan=4>{html.escape(e['error'])}</td></tr>")
            continue
        t = e["tre"]
        link = f"<a href='{e['folder']}/report.png'>report</a>" if e.get("folder") else ""
        rows.append(f"<tr><td>{html.escape(e['method'])}</td><td>{t['mean_mm']:.2f}</td><td>{t['p95_mm']:.2f}</td>"
                    f"<td>{e.get('seconds', 0):.1f}</td><td>{link}</td></tr>")
    images = "".join(f"<h2>{html.escape(e['method'])}</h2><img src='{e['folder']}/report.png' width='100%'>"
                     for e in summary["results"] if e.get("folder"))
    available = [e["method"] for e in summary["results"][1:] if "error" not in e and "peer" not in e["method"]]
    note = ("" if available else "<p>No deep registration method is available in this version yet; the table "
            "shows the classical peer on the same pair.</p>")
    mis = summary["pair"]["misalignment_deg_mm"]
    sim = summary.get("similarity_map") or {}
    if sim.get("file"):
        d = sim["max_distance_to_true_point_mm"]
        images += ("<h2>Similarity maps (DISA, LC², MIND-SSC)</h2><p>Distance of each map's maximum from the "
                   "known corresponding point: " + ", ".join(f"{k} {v:.1f} mm" for k, v in d.items()) +
                   f"</p><img src='{sim['file']}' width='100%'>")
    images += _deep_section(summary.get("deep_interactive"))
    page = f"""<!doctype html><html><head><meta charset='utf-8'><title>DeepMultimodalReg demo</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto}}td,th{{padding:4px 10px;border-bottom:1px solid #ccc}}</style>
</head><body><h1>DeepMultimodalReg demo</h1>
<p>Fixed: {html.escape(summary['pair']['fixed'])} (T1). Moving: the co-registered T2 moved by a known rigid transform
(rotations {mis[0]}°, {mis[1]}°, {mis[2]}°; translation {mis[3]}, {mis[4]}, {mis[5]} mm).
Target registration error (TRE) is measured against that known transform over brain voxels.</p>{note}
<table><tr><th>method</th><th>mean TRE (mm)</th><th>95th pct TRE (mm)</th><th>time (s)</th><th></th></tr>
{''.join(rows)}</table>{images}</body></html>"""
    with atomic_output(out / "index.html") as tmp:
        tmp.write_text(page, encoding="utf-8")


def _deep_section(deep: dict | None) -> str:
    """The interactive workflow's table (in-box errors after each step) and its step pictures."""
    if not deep:
        return ""
    if "error" in deep:
        return f"<h2>Interactive deep refinement</h2><p>Not run: {html.escape(deep['error'])}</p>"
    box = deep["box"]
    rows = "".join(f"<tr><td>{html.escape(step)}</td><td>{e['rmse_hu']:.0f}</td><td>{e['displacement_error_mm']:.2f}</td>"
                   f"<td>{e['seconds']:.1f}</td></tr>" for step, e in deep["in_box"].items())
    pictures = "".join(f"<h3>{html.escape(step)}</h3><img src='{deep['folder']}/{step}/report.png' width='100%'>"
                       for step in deep["in_box"])
    centre = ", ".join(f"{c:.0f}" for c in box["center"])
    return (f"<h2>Interactive deep refinement (chest CT, known deformation)</h2><p>General model, then ISO "
            f"({deep['iterations']['iso']} iterations), then RSO ({deep['iterations']['rso']} iterations) in the "
            f"{box['size'][0]:.0f} mm box centred at ({centre}) mm (LPS) where ISO left the largest error. "
            f"Errors inside the box: RMSE against the clean CT and mean distance to the known displacement.</p>"
            f"<table><tr><th>step</th><th>in-box RMSE (HU)</th><th>in-box displacement error (mm)</th>"
            f"<th>time (s)</th></tr>{rows}</table>{pictures}")
