"""``deepmmreg train disa -o DIR [--minutes M] [--steps N] [--quick] [--init-weights F] ...``."""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidParameterError
from ..fileio import check_output_dir
from .budget_args import run_state, run_with_progress_bar, training_budget
from .disa_train import DisaTrainingConfig, train_disa

#: command-line options copied into the recipe's config when given (same names there)
_OPTIONAL = ("init_weights", "aligned_jitter", "aligned_probability", "learning_rate", "warmup_steps",
             "crop_pairs_per_step", "loss_weighting", "sign_symmetric", "output_init_scale",
             "synthetic_probability", "distil_steps", "teacher_landmarks",
             "distil_rotation_deg")


def config_from_args(args) -> DisaTrainingConfig:
    config = DisaTrainingConfig(seed=args.seed)
    if args.quick:  # a few steps with few anchors, to check the set-up
        config = DisaTrainingConfig(steps=20, anchors_per_crop=64, validation_crop_pairs=2, validation_every=10,
                                    checkpoint_every=10, warmup_steps=5, seed=args.seed)
    steps, config.max_minutes = training_budget(args)
    if steps is not None:
        config.steps = steps
    config.device = getattr(args, "device", None) or "auto"
    for name in _OPTIONAL:
        if getattr(args, name, None) is not None:
            setattr(config, name, getattr(args, name))
    if config.init_weights and not Path(config.init_weights).is_file():
        raise InvalidParameterError(f"initial weights not found: {config.init_weights}")
    return config


def cli_train_disa(args) -> int:
    out = check_output_dir(args.output)
    config = config_from_args(args)
    summary = run_with_progress_bar("train disa", train_disa, out, config, data_dir=args.data_dir)
    v = summary["final_validation"]
    print(f"{run_state(summary)} at step {summary['steps']} after {summary['seconds']:.0f} s: validation MSE {v['mse']:.4f}, "
          f"Pearson {v['pearson']:.3f} on {v['pairs']} held-out pairs; weights {out / 'disa.pt'}")
    return 0
