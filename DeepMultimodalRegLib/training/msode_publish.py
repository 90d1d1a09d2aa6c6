"""Publishing a trained MS-ODE model: the model card and the manifest entry (``training/publish.py``).

    python -m DeepMultimodalRegLib.training.msode_publish out/msode_rigid [--benchmark docs/msode_benchmark_2026-11-21.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .publish import publish_weights


#: how the card names each L_sim option of ``msode/similarity.py``
SIMILARITY_NAMES = {"mind": "MIND-SSC SSD", "disa": "DISA descriptor dot product",
                    "content": "content-feature distance of the msode_translation encoder, paper eq. 4"}


def msode_model_card(summary: dict, benchmark: dict | None = None) -> str:
    c = summary["config"]
    v0, v = summary["initial_validation"], summary["final_validation"]
    kind = summary["kind"]
    name = f"msode_{kind}"
    lines = [
        f"# MS-ODE {kind} model (`{name}`)",
        "",
        f"A multi-scale neural ODE registration optimiser ({summary['parameters']:,} parameters: one "
        f"{'convolutional + fully connected' if kind == 'rigid' else 'fully convolutional'} network per pyramid level),",
        "after Xu et al., MICCAI 2021. Trained by this project's recipe `deepmmreg train msode`",
        "(`DeepMultimodalRegLib/training/msode_train.py`); no weights from elsewhere.",
        "",
        "## Model",
        f"- Working grid {c['size']}³ voxels of {c['spacing_mm']} mm (LPS-aligned, centred on each image), "
        f"L = {c['levels']} levels, T = {c['total_time']}.",
        f"- Network inputs: warped moving and fixed intensities ({c['inputs']}), and t.",
        f"- Solvers: training {c['training_solvers']}; registration default "
        f"{c['inference_solvers'] or 'the paper’s ' + {'rigid': 'A(1e-3)-A(1e-3)-F(0.1)', 'bspline': 'F(0.2)-F(0.2)-F(0.25)', 'dense': 'F(0.2)-F(0.2)-F(0.5)'}[kind]}.",
        "",
        "## Data",
        f"- Anatomies: {', '.join(summary['anatomies'])} (`../shared/data`: voxelmorph test scan with 46 labels;",
        "  MNI152 2009a with labels from its GM/WM maps). Kirby21 is held out for the benchmark.",
        "- Every pair: two label-driven contrasts of one anatomy (`synthesize_contrast`: random intensity per",
        f"  label, bias field, noise; the real T1 with probability {c['real_t1_probability']}), masked to the brain;",
        f"  the fixed one moved by a random motion (the paper's test: ±75°, ±20 mm): rotations U(±{c['rotation_deg']}°) per axis, translations",
        f"  U(±{c['translation_mm']} mm)" + (f"; B-spline control points N(0, {c['bspline_sigma_mm']} mm²)." if kind != "rigid" else "."),
        "",
        "## Training",
        f"- Loss L_sim ({SIMILARITY_NAMES.get(c['similarity'], c['similarity'])}, `{c['similarity']}`) + {c['lambda_self']}·L_self (transform error in mm² / "
        f"{c['self_scale_mm']}², cross-contrast pairs) + λ_reg·L_reg (λ_reg = {c['lambda_reg'] if c['lambda_reg'] is not None else {'rigid': 0, 'bspline': 2, 'dense': 10}[kind]}).",
        f"- Adam, learning rate {c['learning_rate']}, batch {c['batch']}, gradient norm clipped at {c['gradient_clip']}, seed {c['seed']}.",
        f"- Ran {summary['steps']} steps in {summary['seconds'] / 60:.1f} min on {summary['threads']} CPU threads shared with other jobs"
        f" ({'finished' if summary['finished'] else 'stopped by its time limit'}).",
        f"- Validation ({c['validation_batches']} fixed batches of synthetic pairs): transform RMSE {v0['rmse_mm']:.2f} → "
        f"{v['rmse_mm']:.2f} mm; L_sim {v0['sim']:.4f} → {v['sim']:.4f}; L_self {v0['self']:.3f} → {v['self']:.3f}"
        + (f"; L_reg {v0['reg']:.4f} → {v['reg']:.4f}" if kind != "rigid" else "") + ".",
    ]
    if benchmark:
        lines += ["", "## Benchmark", "", "`benchmarks/msode.py` (docs/benchmarks.md), held-out Kirby21 pairs (all ranges pooled):", ""]
        lines += [f"- {k}: {val}" for k, val in benchmark.items()]
    lines += ["", "## Loading", "",
              "`DeepMultimodalRegLib.msode.load_model(kind)` verifies the SHA-256 in `manifest.json` and loads with",
              "`torch.load(..., weights_only=True)`; the model's settings travel inside the state_dict as a JSON byte tensor.",
              "", "## Status", "",
              "A first, CPU-sized run (≤ 30 min on 2 shared cores): far shorter than the paper's training. Read the",
              "benchmark before relying on it; the recipe resumes (`deepmmreg train msode -o DIR --minutes M`).", ""]
    return "\n".join(lines)


def summarise_benchmark(path: Path, method: str = "msode-rigid") -> dict:
    data = json.loads(Path(path).read_text())
    out = {}
    for m in sorted({r["method"] for r in data["records"]}):
        rs = [r for r in data["records"] if r["method"] == m and "rmse_mm" in r]
        if rs:
            e = np.array([r["rmse_mm"] for r in rs])
            out[m] = (f"{len(rs)} cases, success (RMSE(φ) < 2 mm) {100 * np.mean(e < 2):.0f}%, median RMSE(φ) "
                      f"{np.median(e):.1f} mm, median time {np.median([r['seconds'] for r in rs]):.1f} s")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path, help="training folder (summary.json, msode_<kind>.pt)")
    p.add_argument("--benchmark", type=Path)
    args = p.parse_args(argv)
    summary = json.loads((args.run / "summary.json").read_text())
    kind = summary["kind"]
    benchmark = summarise_benchmark(args.benchmark) if args.benchmark else None
    entry = publish_weights(args.run / f"msode_{kind}.pt", f"msode_{kind}", "msode", msode_model_card(summary, benchmark),
                            description=f"MS-ODE {kind} registration optimiser ({summary['config']['size']}³ × "
                                        f"{summary['config']['spacing_mm']} mm working grid, L = {summary['config']['levels']})")
    print(json.dumps(entry.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
