"""``deepmmreg train translation -o DIR [--minutes M] [--steps N] [--quick]``: MS-ODE's similarity network."""

from __future__ import annotations

from ..fileio import check_output_dir
from .budget_args import run_state, run_with_progress_bar, training_budget
from .translation_train import TranslationTrainingConfig, train_translation


def config_from_args(args) -> TranslationTrainingConfig:
    config = TranslationTrainingConfig(seed=args.seed)
    if args.quick:  # a few small steps, to check the set-up
        config = TranslationTrainingConfig(seed=args.seed, steps=3, batch=2, grid=48, spacing_mm=6.0, crop=32,
                                           width=8, content_channels=8, validation_every=3, validation_batches=1,
                                           checkpoint_every=1)
    steps, config.max_minutes = training_budget(args)
    if steps is not None:
        config.steps = steps
    if getattr(args, "learning_rate", None) is not None:
        config.learning_rate = args.learning_rate
    return config


def cli_train_translation(args) -> int:
    out = check_output_dir(args.output)
    config = config_from_args(args)
    summary = run_with_progress_bar("train translation", train_translation, out, config, data_dir=args.data_dir)
    v0, v = summary["initial_validation"], summary["final_validation"]
    print(f"{run_state(summary)} at step {summary['steps']} after {summary['seconds']:.0f} s: validation self-reconstruction "
          f"{v0['x']:.3f} -> {v['x']:.3f}, cycle {v0['cyc']:.3f} -> {v['cyc']:.3f}, content ratio (same anatomy / "
          f"other slice) {v0['content_ratio']:.3f} -> {v['content_ratio']:.3f}; weights {summary['weights']}")
    return 0
