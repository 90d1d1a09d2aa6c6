"""Publishing a trained network into the package: weights file, SHA-256 manifest entry, model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..fileio import atomic_output
from ..weights import manifest as manifest_module
from ..weights.manifest import ModelEntry, load_manifest, sha256_of


def publish_weights(weights: Path, name: str, method: str, card_text: str, description: str = "",
                    status: str = "") -> ModelEntry:
    """Copy ``weights`` into the package's weights folder as ``{name}.pt``, write ``{name}_card.md``
    and add or replace the manifest entry (atomically).  ``status``: the known limits users must see
    (:attr:`ModelEntry.status`); a replaced entry's status is not carried over."""
    weights_dir = manifest_module.WEIGHTS_DIR
    state = torch.load(weights, map_location="cpu", weights_only=True)  # refuses anything but tensors
    target = weights_dir / f"{name}.pt"
    with atomic_output(target) as tmp:
        shutil.copyfile(weights, tmp)
    card = weights_dir / f"{name}_card.md"
    with atomic_output(card) as tmp:
        tmp.write_text(card_text, encoding="utf-8")
    entry = ModelEntry(name=name, method=method, file=target.name, sha256=sha256_of(target),
                       parameters=int(sum(v.numel() for v in state.values() if v.dtype.is_floating_point)),
                       card=card.name, description=description, status=status)
    entries = [e for e in load_manifest() if e.name != name] + [entry]
    with atomic_output(manifest_module.MANIFEST) as tmp:
        tmp.write_text(json.dumps({"models": [
            {k: v for k, v in e.as_dict().items() if k not in ("path", "card_path")} for e in entries]}, indent=2) + "\n")
    return entry


#: the card's words for DisaTrainingConfig.loss_weighting
_LOSS_WEIGHTING_TEXT = {
    "bins": "pair weights flatten the target histogram over [0, 1] (10 bins, equal total weight, all "
            "anchors pooled)",
    "t-sampling": "each pair weighs the probability that the paper's t-sampling picks it for its anchor",
}


def _distillation_lines(summary: dict) -> list[str]:
    """The card's lines on the teacher stage of a run (``train disa --distil-steps``), if it had one."""
    c = summary["config"]
    steps = c.get("distil_steps", 0)
    if not steps:
        return []
    teacher = summary.get("teacher") or {}
    return [
        f"- Steps 1–{steps}: distillation. Each step regresses the descriptors of two 65³ crops (corners on",
        "  the descriptor grid; a random sign and affine intensity change each, no rotation) onto a teacher",
        "  embedding at every site ≥ 8 voxels from the faces (`training/disa_teacher.py`): the symmetric",
        f"  DISA target of the patch against {c.get('teacher_landmarks')} landmark patches of the training scans, mapped",
        "  linearly to 16 dimensions (Nyström start, refined on t-sampling-weighted LC² pairs), norm ≤ 1"
        + (f"; refinement loss {teacher['weighted_loss_nystrom']:.4f} → {teacher['weighted_loss_refined']:.4f}."
           if "weighted_loss_refined" in teacher else "."),
        f"  The paper's pairwise loss (below) follows from step {steps + 1}." if summary["steps"] > steps
        else "  The run ended inside this stage: the pairwise loss below was not used.",
    ]


def disa_model_card(summary: dict, benchmark: dict | None = None) -> str:
    """The DISA model card from a training run's summary.json (and the descriptor benchmark)."""
    c = summary["config"]
    v = summary["final_validation"]
    lines = [
        "# DISA descriptor network (`disa`)",
        "",
        "A 90,752-parameter 3D CNN whose 16-channel descriptors' dot product approximates the LC²",
        "similarity (mean over patch radii 3, 5, 7) of two patches, after Ronchetti et al., MICCAI 2023.",
        "Trained by this project's recipe `deepmmreg train disa` "
        "(`DeepMultimodalRegLib/training/disa_train.py`); no weights from elsewhere.",
        "",
        "## Data",
        f"- Training scans (resampled to {c['spacing_mm']} mm, z-scored): {', '.join(summary['train_scans'])}.",
        f"- Held-out validation scans (never seen in training): {', '.join(summary['validation_scans'])}.",
        "- Sources and licences: `../shared/data/README.md` of the project (Kirby21, MNI152 2009a,",
        "  voxelmorph test scan, LIDC-IDRI-0001; validation: Colin27, TotalSegmentator pelvis CT).",
        "",
        "## Sampler",
        "- Crops of 65³ voxels, sites every 4 voxels at ≥ 12 voxels from the faces (11³ per crop);",
        f"  {c['anchors_per_crop']} anchors per crop pair, picked ∝ local variance (radius 7), each paired with",
        f"  every site of the other crop (dense loss); {_LOSS_WEIGHTING_TEXT[c.get('loss_weighting', 'bins')]}.",
        "  Validation pairs use the paper's sampler itself (partner = the site whose target is closest to",
        "  t ~ U[0, 1]).",
        f"- Co-registered scans (Kirby21 T1/T2/FLAIR) use the same crop place with probability {c['aligned_probability']}"
        + (f", shifted by up to {c['aligned_jitter']} voxels per axis." if c.get("aligned_jitter") else "."),
        *([f"- Synthetic co-registered pairs in {c['synthetic_probability']:.0%} of the steps: two label-driven contrasts",
           "  (random intensity per label mixed with a random transfer of the scan, bias field, noise) of one",
           "  crop of a labelled training scan (MNI152 tissue maps, voxelmorph 46 labels, LIDC 118 labels),",
           "  or the scan and one such contrast; same place"
           + (f", shifted by up to {c['aligned_jitter']} voxels per axis." if c.get("aligned_jitter") else ".")]
          if c.get("synthetic_probability") else []),
        "- Augmentation: the same random cube symmetry (axis permutation + flips) for both crops, and an",
        "  independent random sign and affine intensity change per crop (LC² targets unchanged).",
        *(["- Trained on sign-symmetric descriptors ½(φ(x) + φ(−x)), as registration computes them."]
          if c.get("sign_symmetric") else []),
        *_distillation_lines(summary),
        "",
        "## Training",
        f"- AdamW, learning rate {c['learning_rate']}, weight decay {c['weight_decay']}, {c['warmup_steps']} warm-up steps,",
        f"  cosine decay over {c['steps']} steps; gradient norm clipped at {c.get('gradient_clip')};",
        f"  {c['crop_pairs_per_step']} crop pair(s) per step; seed {c['seed']}.",
        *([f"- Started from scratch with the last layer's default initialisation × {c['output_init_scale']:g}."]
          if c.get("output_init_scale", 1.0) != 1.0 and not c.get("init_weights") else []),
        f"- Ran {summary['steps']} steps in {summary['seconds'] / 60:.1f} min on {summary['threads']} CPU threads"
        f" ({'finished' if summary['finished'] else 'stopped by its time limit'}).",
        f"- Final training MSE (running average): {summary['train_mse_running']:.4f}.",
        f"- Validation on {v['pairs']} held-out pairs: MSE {v['mse']:.4f}, Pearson {v['pearson']:.3f}"
        f" (targets mean {v['target_mean']:.3f}, std {v['target_std']:.3f}).",
    ]
    if benchmark:
        lines += ["", "## Benchmark", "", "`benchmarks/disa_descriptor.py` (see docs/benchmarks.md):", ""]
        lines += [f"- {k}: {val}" for k, val in benchmark.items()]
    lines += ["", "## Loading", "", "`DeepMultimodalRegLib.networks.load_disa_network()` verifies the SHA-256 in",
              "`manifest.json` and loads with `torch.load(..., weights_only=True)`.", ""]
    return "\n".join(lines)
