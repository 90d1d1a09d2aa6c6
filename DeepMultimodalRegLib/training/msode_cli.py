"""``deepmmreg train msode [--kind rigid|bspline|dense] -o DIR [--minutes M] [--steps N] [--quick]``."""

from __future__ import annotations

from ..fileio import check_output_dir
from .budget_args import run_state, run_with_progress_bar, training_budget
from .msode_train import MSODETrainingConfig, train_msode


def config_from_args(args) -> MSODETrainingConfig:
    kind = getattr(args, "kind", None) or "rigid"
    config = MSODETrainingConfig(kind=kind, seed=args.seed)
    if args.quick:  # a few steps on a small grid, to check the set-up
        config = MSODETrainingConfig(kind=kind, seed=args.seed, steps=3, batch=1, size=32, spacing_mm=8.0,
                                     levels=2, training_solvers="F(0.5)-F(1.0)", inference_solvers="F(0.5)-F(1.0)",
                                     validation_every=3, validation_batches=1, checkpoint_every=1, width=8)
    steps, config.max_minutes = training_budget(args)
    if steps is not None:
        config.steps = steps
    if getattr(args, "motion_deg", None) is not None:
        config.rotation_deg = args.motion_deg
    if getattr(args, "motion_mm", None) is not None:
        config.translation_mm = args.motion_mm
    if getattr(args, "similarity", None) is not None:
        config.similarity = args.similarity
    if getattr(args, "learning_rate", None) is not None:
        config.learning_rate = args.learning_rate
    if getattr(args, "gradient_input", False):
        config.gradient_input = True
    if getattr(args, "descent_rate", None) is not None:
        config.descent_rate = args.descent_rate
    if getattr(args, "ode_solvers", None):
        config.training_solvers = config.inference_solvers = args.ode_solvers
    config.device = getattr(args, "device", None) or "auto"
    if getattr(args, "grid_size", None) is not None:
        config.size = args.grid_size
    if getattr(args, "grid_spacing", None) is not None:
        config.spacing_mm = args.grid_spacing
    return config


def cli_train_msode(args) -> int:
    out = check_output_dir(args.output)
    config = config_from_args(args)
    summary = run_with_progress_bar(f"train msode {config.kind}", train_msode, out, config, data_dir=args.data_dir)
    v0, v = summary["initial_validation"], summary["final_validation"]
    print(f"{run_state(summary)} at step {summary['steps']} after {summary['seconds']:.0f} s: validation transform RMSE "
          f"{v0['rmse_mm']:.2f} -> {v['rmse_mm']:.2f} mm, L_sim {v0['sim']:.4f} -> {v['sim']:.4f}; "
          f"weights {summary['weights']}")
    return 0
