"""Publishing a trained MS-ODE model: the model card and the manifest entry (``training/publish.py``).

    python -m DeepMultimodalRegLib.training.msode_publish out/msode_rigid [--benchmark docs/msode_benchmark_2026-11-21.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..msode.model import MSODE
from .publish import publish_weights


#: how the card names each L_sim option of ``msode/similarity.py``
SIMILARITY_NAMES = {"mind": "MIND-SSC SSD", "disa": "DISA descriptor dot product",
                    "content": "content-feature distance of the msode_translation encoder, paper eq. 4"}


def msode_model_card(summary: dict, benchmark: dict | None = None, history: str | None = None,
                     shipped: dict | None = None) -> str:
    """The card of a trained MS-ODE model from its run's summary.json; ``benchmark`` (from
    :func:`summarise_benchmark`) and ``history`` (free text: what the summary cannot tell, e.g. that
    the run resumed from a model trained with other settings) are added when given.  ``shipped``: the
    stored :class:`~..msode.model.MSODEConfig` (as a dict) of the weights published, when they are
    not the run's own (e.g. with a finer level added by ``training/msode_extend.py``)."""
    c = summary["config"]
    v0, v = summary["initial_validation"], summary["final_validation"]
    kind = summary["kind"]
    name = f"msode_{kind}"
    m = shipped or {"size": c["size"], "spacing_mm": c["spacing_mm"], "levels": c["levels"],
                    "total_time": c["total_time"], "solvers": c["inference_solvers"],
                    "gradient_input": c.get("gradient_input", False), "descent_rate": c.get("descent_rate")}
    paper_solvers = {'rigid': 'A(1e-3)-A(1e-3)-F(0.1)', 'bspline': 'F(0.2)-F(0.2)-F(0.25)', 'dense': 'F(0.2)-F(0.2)-F(0.5)'}
    lines = [
        f"# MS-ODE {kind} model (`{name}`)",
        "",
        f"A multi-scale neural ODE registration optimiser ({summary['parameters']:,} parameters trained: one "
        f"{'convolutional + fully connected' if kind == 'rigid' else 'fully convolutional'} network per pyramid level),",
        "after Xu et al., MICCAI 2021. Trained by this project's recipe `deepmmreg train msode`",
        "(`DeepMultimodalRegLib/training/msode_train.py`); no weights from elsewhere.",
        "",
        "## Model",
        f"- Working grid {m['size']}³ voxels of {m['spacing_mm']} mm (LPS-aligned, centred on each image), "
        f"L = {m['levels']} levels, T = {m['total_time']:g}."
        + (f" Trained at {c['size']}³ × {c['spacing_mm']} mm with L = {c['levels']}; see the history."
           if (m['size'], m['levels']) != (c['size'], c['levels']) else ""),
        f"- Network inputs: warped moving and fixed intensities ({c['inputs']}), and t"
        + (f"; and, not in the paper, the MIND-SSC descent direction −P·∂L_sim/∂θ (rate {m['descent_rate']:g}),"
           " also added to the output through a learned gain (`MSODEConfig.gradient_input`)." if m.get("gradient_input") else "."),
        f"- Solvers: training {c['training_solvers']}; registration default "
        f"{m['solvers'] or 'the paper’s ' + paper_solvers[kind]}.",
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
    p.add_argument("--weights", type=Path, help="the weights to publish (default: the run's msode_<kind>.pt), e.g. "
                                                "the run's model with a finer level added (training/msode_extend.py)")
    p.add_argument("--status", default="", help="the known limits users must see (manifest status)")
    args = p.parse_args(argv)
    summary = json.loads((args.run / "summary.json").read_text(encoding="utf-8"))
    kind = summary["kind"]
    benchmark = summarise_benchmark(args.benchmark) if args.benchmark else None
    history = args.history.read_text(encoding="utf-8") if args.history else None
    weights = args.weights or args.run / f"msode_{kind}.pt"
    shipped = asdict(MSODE.from_state_dict(torch.load(weights, map_location="cpu", weights_only=True)).config)
    card = msode_model_card(summary, benchmark, history, shipped if args.weights else None)
    entry = publish_weights(weights, f"msode_{kind}", "msode", card, status=args.status,
                            description=f"MS-ODE {kind} registration optimiser ({shipped['size']}³ × "
                                        f"{shipped['spacing_mm']} mm working grid, L = {shipped['levels']})")
    print(json.dumps(entry.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
