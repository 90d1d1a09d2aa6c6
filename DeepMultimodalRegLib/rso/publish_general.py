"""Publish a ``deepmmreg train general`` run into the package: ``weights/general.pt``, its SHA-256 in
``weights/manifest.json`` and the model card ``weights/general_card.md``.

Usage: ``python -m DeepMultimodalRegLib.rso.publish_general RUN_DIR [--benchmark BENCH.json]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..training.publish import publish_weights


def general_model_card(summary: dict, benchmark: dict | None = None, command: str = "", sha256: str = "") -> str:
    c = summary["config"]
    v = summary["final_validation"]
    first = summary["validation"][0] if summary["validation"] else v
    lines = [
        "# General deep registration model (`general`)",
        "",
        "The general model of the RSO workflow (Bai et al. 2023): MONAI `UNet(spatial_dims=3, in_channels=2,",
        "out_channels=3, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)`,",
        f"{summary['parameters']:,} trainable parameters (plus one buffer: the working spacing). Input: fixed and moving",
        "image on the working grid (CT (HU + 1000) / 2000, MR 1st–99th percentile, both clipped to [0, 1]);",
        "output: the displacement in working voxels. Trained by this project's recipe `deepmmreg train general`",
        "(`DeepMultimodalRegLib/rso/train_general.py`); no weights from elsewhere. Stored as float16.",
        "",
        f"Weights file `general.pt`, SHA-256 `{sha256}` (also in `manifest.json`)." if sha256 else "",
        "",
        "## Data",
        f"- Training scans (normalised, resampled to {c['spacing_mm']:g} mm): {', '.join(summary['train_scans'])}.",
        f"- Held-out validation scans (never trained on): {', '.join(summary['validation_scans'])}.",
        "- Sources and licences: `../shared/data/README.md` (LIDC-IDRI-0001 chest CT, Kirby21, MNI152 2009a,",
        "  voxelmorph test scan; validation: TotalSegmentator pelvis CT, Colin27).",
        "- Note: the chest CT used by `benchmarks/rso_vs_iso.py` was among the training scans (under other",
        "  random deformations); the pelvis CT was not.",
        "",
        "## Pairs (self-supervised)",
        f"- A random {c['crop']}³-voxel crop of a scan ({100 * c['ct_probability']:.0f}% of steps on CT) with the paper's",
        f"  augmentation: rotations up to ±{c['rotation_rad'][0]}/±{c['rotation_rad'][1]}/±{c['rotation_rad'][2]} rad about x/y/z,"
        f" zoom {c['zoom'][0]}–{c['zoom'][1]}.",
        f"- Moving = the crop through a random smooth deformation: {c['field_bank']} fields from"
        " `synthetic.smooth_random_deformation`",
        f"  (control spacing {c['control_spacing_mm'][0]:g}–{c['control_spacing_mm'][1]:g} mm), randomly flipped and scaled to"
        f" {c['max_displacement_mm'][0]:g}–{c['max_displacement_mm'][1]:g} mm.",
        f"- CT pairs: CBCT-like artefacts (streaks, correlated noise, cupping, intensity shift) on one image with"
        f" probability {c['artefact_probability']}.",
        "",
        "## Training",
        f"- Loss: MSE(warped moving, fixed) + {c['smoothness_weight']} × diffusion (MONAI `DiffusionLoss`); Adam,"
        f" learning rate {c['learning_rate']} (the paper's), batch 1, seed {c['seed']}.",
        f"- Ran {summary['steps']} steps in {summary['seconds'] / 60:.1f} min on {summary['threads']} CPU thread(s) of a shared"
        f" 2-core machine ({'finished' if summary['finished'] else 'stopped by its time budget'}).",
        f"- Final training MSE (running average): {summary['train_mse_running']:.5f}.",
        f"- Held-out validation ({v['pairs']} pairs): MSE {v['mse_identity']:.5f} (no registration) → {v['mse_model']:.5f};"
        f" mean displacement error in the body {v['displacement_error_identity_mm']:.2f} mm → "
        f"{v['displacement_error_model_mm']:.2f} mm.",
        f"  (first validation, step {first['step']}: MSE {first['mse_model']:.5f}, error {first['displacement_error_model_mm']:.2f} mm)",
        "",
        "## Reproduce",
        "",
        "```",
        command or f"deepmmreg train general -o out/general_run --minutes 40 --seed {c['seed']}   # resumes when run again",
        "python -m DeepMultimodalRegLib.rso.publish_general out/general_run",
        "```",
    ]
    if benchmark:
        lines += ["", "## Benchmark", "", "`benchmarks/rso_vs_iso.py` (see docs/benchmarks.md):", ""]
        lines += [f"- {k}: {val}" for k, val in benchmark.items()]
    lines += ["", "## Status", "",
              "A short CPU run (tens of minutes, one thread): the model gives a first estimate that ISO and RSO",
              "refine; it is not a converged population model. Retrain longer (the recipe resumes) or on a GPU",
              "for a better starting point.", "",
              "## Loading", "",
              "`DeepMultimodalRegLib.rso.weights.load_general_model()` checks the SHA-256 in `manifest.json` and loads",
              "with `torch.load(..., weights_only=True)`.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="publish a general-model training run into the package")
    p.add_argument("run", type=Path)
    p.add_argument("--benchmark", type=Path, help="a JSON object of benchmark lines for the card")
    p.add_argument("--command", default="", help="the training command, for the card")
    args = p.parse_args(argv)
    summary = json.loads((args.run / "summary.json").read_text())
    benchmark = json.loads(args.benchmark.read_text()) if args.benchmark else None
    from ..weights.manifest import sha256_of

    card = general_model_card(summary, benchmark, args.command, sha256_of(args.run / "general.pt"))
    entry = publish_weights(args.run / "general.pt", "general", "deep", card,
                            description=f"general deep registration model (MONAI U-Net 16-256, trained at "
                                        f"{summary['config']['spacing_mm']:g} mm)")
    print(f"published {entry.file} sha256 {entry.sha256} ({entry.parameters:,} values), card {entry.card}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
