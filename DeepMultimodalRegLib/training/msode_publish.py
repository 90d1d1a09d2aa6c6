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


def msode_model_card(summary: dict, benchmark: dict | None = None, history: str | None = None) -> str:
    """The card of a trained MS-ODE model from its run's summary.json; ``benchmark`` (from
    :func:`summarise_benchmark`) and ``history`` (free text: what the summary cannot tell, e.g. that
    the run resumed from a model trained with other settings) are added when given."""
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
    if history:
        lines += ["", "## Training history", "", history.strip()]
    if benchmark:
        lines += ["", "## Benchmark", "", "`benchmarks/msode.py` (docs/benchmarks.md), held-out Kirby21 pairs, per motion and rotation range:", ""]
        lines += [f"- {k}: {val}" for k, val in benchmark.items()]
    lines += ["", "## Loading", "",
              "`DeepMultimodalRegLib.msode.load_model(kind)` verifies the SHA-256 in `manifest.json` and loads with",
              "`torch.load(..., weights_only=True)`; the model's settings travel inside the state_dict as a JSON byte tensor.",
              "", "## Status", "",
              f"A CPU-sized run ({summary['seconds'] / 60:.0f} min in all): far shorter than the paper's training. Read the",
              "benchmark before relying on it; the recipe resumes (`deepmmreg train msode -o DIR --minutes M`).", ""]
    return "\n".join(lines)


def summarise_benchmark(path: Path) -> dict:
    """One line per (motion, rotation range, method) of a ``benchmarks/msode.py`` record: pooling the
    ranges would hide what matters (a model can work at ±25° and fail at ±75°)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    groups: dict = {}
    for r in data["records"]:
        if "rmse_mm" in r:
            groups.setdefault((r.get("motion", "rigid"), r.get("range_deg"), r["method"]), []).append(r)
    out = {}
    for (motion, range_deg, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -(kv[0][1] or 0), kv[0][2])):
        e = np.array([r["rmse_mm"] for r in rs])
        start = np.array([r["initial_rmse_mm"] for r in rs]) if all("initial_rmse_mm" in r for r in rs) else None
        label = f"{motion}" + (f" ±{range_deg:g}°" if range_deg else "") + f", {method}"
        out[label] = (f"{len(rs)} cases, success (RMSE(φ) < 2 mm) {100 * np.mean(e < 2):.0f}%, median RMSE(φ) "
                      + (f"{np.median(start):.1f} → " if start is not None else "")
                      + f"{np.median(e):.1f} mm, median time {np.median([r['seconds'] for r in rs]):.1f} s")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path, help="training folder (summary.json, msode_<kind>.pt)")
    p.add_argument("--benchmark", type=Path)
    p.add_argument("--history", type=Path, help="a text file whose content goes into the card's 'Training history'")
    args = p.parse_args(argv)
    summary = json.loads((args.run / "summary.json").read_text(encoding="utf-8"))
    kind = summary["kind"]
    benchmark = summarise_benchmark(args.benchmark) if args.benchmark else None
    history = args.history.read_text(encoding="utf-8") if args.history else None
    card = msode_model_card(summary, benchmark, history)
    entry = publish_weights(args.run / f"msode_{kind}.pt", f"msode_{kind}", "msode", card,
                            description=f"MS-ODE {kind} registration optimiser ({summary['config']['size']}³ × "
                                        f"{summary['config']['spacing_mm']} mm working grid, L = {summary['config']['levels']})")
    print(json.dumps(entry.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
