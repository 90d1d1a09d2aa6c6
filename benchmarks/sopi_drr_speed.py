"""DRR rendering speed: this library's projector vs DiffDRR on the same CT, detector and pose (CPU).

What is measured: rays × samples per ray per second of one render (after one warm-up render), for

* this library (``DeepMultimodalRegLib.sopi.drr.DRRProjector``: trilinear, midpoint rule over each
  ray's own chord through the CT box), at its default step (half the smallest voxel) and at the
  same number of samples per ray as DiffDRR's trilinear renderer;
* DiffDRR's ``trilinear`` renderer (``n_points`` samples spread over the rays' common [α_min, α_max]);
* DiffDRR's default ``siddon`` renderer (one sample per voxel-plane crossing: nx+ny+nz+2 per ray).

Same CT (the real chest CT of ../shared/data, HU), same detector (SDD 1011.7 mm, the paper's
detector resampled to ``--size`` pixels), same pose (AP view, CT centre at the isocentre, source
600 mm from it).  As a check that both render the same view, the NCC between the two images is
reported (after trying the detector flips that differ between the two conventions).

DiffDRR is a benchmark-only peer, installed without its heavy optional dependencies:
``pip install --no-deps diffdrr fastcore einops torchio nibabel jaxtyping humanize deprecated wrapt pandas``.

    .venv/bin/python benchmarks/sopi_drr_speed.py --size 128 --threads 1 --json out/sopi_drr_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from DeepMultimodalRegLib.image import read_volume  # noqa: E402
from DeepMultimodalRegLib.metrics.similarity2d import ncc  # noqa: E402
from DeepMultimodalRegLib.sopi.drr import DRRProjector  # noqa: E402
from DeepMultimodalRegLib.sopi.geometry import CarmGeometry  # noqa: E402


def timed(fn, repeats: int = 1):
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return out, (time.perf_counter() - t) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ct", default=str(REPO.parent / "shared" / "data" / "ct_chest_lidc0001" / "ct.nii.gz"))
    ap.add_argument("--size", type=int, default=128, help="detector pixels per side (paper: 256)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--diffdrr-points", type=int, default=500, help="DiffDRR trilinear n_points (its default)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ct = read_volume(args.ct).float()
    geometry = CarmGeometry().resized(args.size)
    pose = torch.zeros(1, 6, dtype=torch.float64)
    rays = args.size * args.size
    rows = []

    ours = DRRProjector(ct, geometry)
    with torch.no_grad():
        img_ours, sec = timed(lambda: ours.render(pose))
    rows.append({"renderer": "this library (default step)", "samples_per_ray": ours.samples_per_ray,
                 "seconds": sec, "rate": rays * ours.samples_per_ray / sec})
    matched = DRRProjector(ct, geometry)
    matched.samples_per_ray = args.diffdrr_points
    with torch.no_grad():
        _, sec = timed(lambda: matched.render(pose))
    rows.append({"renderer": f"this library ({args.diffdrr_points} samples/ray)",
                 "samples_per_ray": args.diffdrr_points, "seconds": sec, "rate": rays * args.diffdrr_points / sec})

    similarity = None
    try:
        import diffdrr
        from diffdrr.data import read
        from diffdrr.drr import DRR

        subject = read(args.ct, orientation="AP")
        spacing = geometry.pixel_spacing_mm[0]
        rot = torch.zeros(1, 3)
        trans = torch.tensor([[0.0, geometry.source_to_isocenter_mm, 0.0]])
        for renderer, kwargs in (("trilinear", {"n_points": args.diffdrr_points}), ("siddon", {})):
            drr = DRR(subject, sdd=geometry.source_to_detector_mm, height=args.size, delx=spacing,
                      renderer=renderer)
            with torch.no_grad():
                img, sec = timed(lambda: drr(rot, trans, parameterization="euler_angles", convention="ZXY", **kwargs))
            n = args.diffdrr_points if renderer == "trilinear" else int(sum(ct.shape)) + 2
            rows.append({"renderer": f"DiffDRR {diffdrr.__version__} {renderer}", "samples_per_ray": n,
                         "seconds": sec, "rate": rays * n / sec})
            if renderer == "trilinear":
                theirs = img[0, 0].float()
                a = img_ours[0].float()
                similarity = max(float(ncc(a, t)) for t in (theirs, theirs.flip(0), theirs.flip(1),
                                                             theirs.flip(0).flip(1), theirs.T, theirs.T.flip(0),
                                                             theirs.T.flip(1), theirs.T.flip(0).flip(1)))
    except ImportError as exc:
        print(f"DiffDRR not importable ({exc}); only this library was timed")

    ref = next((r for r in rows if r["renderer"].startswith("DiffDRR") and "trilinear" in r["renderer"]), None)
    print(f"CT {ct.shape} (z,y,x) spacing {ct.geometry.spacing}; detector {args.size}²; {args.threads} thread(s)")
    for r in rows:
        ratio = f"  ×{r['rate'] / ref['rate']:.2f} vs DiffDRR trilinear" if ref else ""
        print(f"{r['renderer']:<38} {r['samples_per_ray']:>5} samples/ray  {r['seconds']:7.2f} s  "
              f"{r['rate'] / 1e6:8.1f} M ray·samples/s{ratio}")
    if similarity is not None:
        print(f"NCC(this library, DiffDRR trilinear) = {similarity:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "ncc_vs_diffdrr": similarity, "size": args.size,
                                         "threads": args.threads, "ct_shape": ct.shape,
                                         "torch": torch.__version__, "python": platform.python_version(),
                                         "date": time.strftime("%Y-%m-%d")}, indent=2))


if __name__ == "__main__":
    main()
