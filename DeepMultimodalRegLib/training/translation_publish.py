"""Publishing a trained translation model (MS-ODE's similarity): model card and manifest entry.

    python -m DeepMultimodalRegLib.training.translation_publish out/translation_run1 [--kirby21 measured.json]

``--kirby21``: the content distances measured on the held-out Kirby21 slices (a JSON object of
``{"label": "value"}`` lines for the card), e.g. those ``Testing/test_msode_translation.py`` checks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .publish import publish_weights

NAME = "msode_translation"


def translation_model_card(summary: dict, measured: dict | None = None) -> str:
    c = summary["config"]
    v0, v = summary["initial_validation"], summary["final_validation"]
    lines = [
        f"# MS-ODE translation model (`{NAME}`): the content encoder behind `similarity=\"content\"`",
        "",
        f"A disentangled 2D image-to-image translation model ({summary['parameters']:,} parameters; the content",
        f"encoder E^c alone {summary['content_encoder_parameters']:,}) on {c['slices']} adjacent slices as channels, after",
        "Xu et al., MICCAI 2021, section 2.2. Only E^c is used for registration (paper eq. 4:",
        "`DeepMultimodalRegLib/msode/content_similarity.py`). Trained by this project's recipe",
        "`deepmmreg train translation` (`DeepMultimodalRegLib/training/translation_train.py`); no weights from elsewhere.",
        "",
        "## Model",
        f"- E^c: 5×5 conv ({c['width']}) → stride-2 conv ({c['content_channels']}) → residual blocks, instance-normalised;",
        f"  content maps at half the input resolution. E^s: convolutions, global average pooling, FC → {c['style_dim']}-D style.",
        "  G: content + one-hot contrast channels, AdaIN residual blocks from an MLP of (style, one-hot), transposed conv.",
        "  Discriminator (training only, not shipped): patch LSGAN with one output map per contrast group.",
        f"- Slices at {c['spacing_mm']} mm; the similarity resamples other grids to it (trilinear, differentiable).",
        "",
        "## Data",
        f"- Anatomies: {', '.join(summary['anatomies'])} (`../shared/data`: voxelmorph test scan with 46 labels;",
        f"  MNI152 2009a with labels from its GM/WM maps), on a {c['grid']}³ × {c['spacing_mm']} mm grid.",
        "  Kirby21 (subject 113, the only one with real T1/T2/FLAIR) is held out: MS-ODE's benchmark and",
        "  this encoder's test use it. Colin27 is not used.",
        f"- Contrast groups (one-hot code): {', '.join(summary['contrasts'])} — the real T1 with a random gamma",
        "  (0.7–1.4), and label-driven synthesis (`synthesize_contrast`: random intensity per label, bias field, noise).",
        f"- Samples: {c['slices']}-slice stacks along a random axis, {c['crop']}×{c['crop']} crops around the brain,",
        f"  rotated in-plane U(±{c['rotation_deg']}°), maybe mirrored; both contrasts of a pair share the geometry.",
        "",
        "## Training",
        f"- Losses: {c['lambda_gan']}·adversarial (LSGAN) + {c['lambda_x']}·self-reconstruction + {c['lambda_cyc']}·cycle",
        f"  + {c['lambda_content']}·content reconstruction + {c['lambda_style']}·style reconstruction (all L1)",
        f"  + {c['lambda_pair']}·|E^c(x_a) − E^c(x_b)| for the co-registered pair (not in the paper; see the recipe).",
        f"- Adam (β = 0.5, 0.999), learning rate {c['learning_rate']}, batch {c['batch']}, seed {c['seed']}.",
        f"- Ran {summary['steps']} steps in {summary['seconds'] / 60:.1f} min on {summary['threads']} CPU thread(s) shared"
        f" with other jobs ({'finished' if summary['finished'] else 'stopped by its time limit'}).",
        f"- Validation ({c['validation_batches']} fixed batches of {c['batch']} synthetic pairs), start → end:",
        f"  self-reconstruction {v0['x']:.3f} → {v['x']:.3f}, cycle {v0['cyc']:.3f} → {v['cyc']:.3f}, content",
        f"  reconstruction {v0['content']:.3f} → {v['content']:.3f}, style {v0['style']:.4f} → {v['style']:.4f},",
        f"  paired content {v0['pair']:.3f} → {v['pair']:.3f}, generator adversarial {v0['gan']:.3f} → {v['gan']:.3f},",
        f"  discriminator {v0['disc']:.3f} → {v['disc']:.3f}; content ratio (same slice, other contrast ÷ other slice)",
        f"  {v0['content_ratio']:.3f} → {v['content_ratio']:.3f}.",
    ]
    if measured:
        lines += ["", "## Held-out Kirby21 (real T1/T2/FLAIR)", ""]
        lines += [f"- {k}: {val}" for k, val in measured.items()]
    lines += ["", "## Loading", "",
              "`DeepMultimodalRegLib.msode.content_similarity.load_content_encoder()` verifies the SHA-256 in",
              "`manifest.json` and loads with `torch.load(..., weights_only=True)`; the settings travel inside the",
              "state_dict as a JSON byte tensor.", "", "## Status", "",
              "A first, CPU-sized run on two anatomies: far shorter than the paper's training on 444 BraTS subjects.",
              "No shipped MS-ODE model is trained on this similarity yet (they use MIND-SSC).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path, help="training folder (summary.json, msode_translation.pt)")
    p.add_argument("--kirby21", type=Path, help="JSON object of measured held-out distances for the card")
    args = p.parse_args(argv)
    summary = json.loads((args.run / "summary.json").read_text())
    measured = json.loads(args.kirby21.read_text()) if args.kirby21 else None
    entry = publish_weights(args.run / f"{NAME}.pt", NAME, "msode", translation_model_card(summary, measured),
                            description=f"MS-ODE similarity: disentangled translation model, content encoder E^c "
                                        f"({summary['config']['slices']} slices, {summary['config']['spacing_mm']} mm)")
    print(json.dumps(entry.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
