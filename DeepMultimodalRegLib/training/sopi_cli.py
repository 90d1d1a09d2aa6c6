"""``deepmmreg train sopi CT --geometry G.json -o MODEL_DIR [--labels LABELMAP] [--minutes M] [--quick]``."""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidParameterError
from ..fileio import check_output_dir
from ..image.io import read_volume
from ..sopi.geometry import read_geometry
from ..sopi.patient import spine_label_ids, structure_mask
from ..sopi.register import validate_ct
from .budget_args import run_state, run_with_progress_bar, training_budget
from .sopi_train import SopiTrainingConfig, train_sopi


def config_from_args(args) -> SopiTrainingConfig:
    config = SopiTrainingConfig(seed=args.seed)
    if args.quick:  # a few CPU minutes: checks the set-up end to end, not a usable model
        config = SopiTrainingConfig(seed=args.seed, rtpi_steps=60, fine_steps=30, rtpi_batch=4, fine_batch=2,
                                    validation_cases=2, fine_iterations=8, checkpoint_every=10)
    steps, minutes = training_budget(args)
    if steps is not None:
        config.rtpi_steps = config.fine_steps = steps
    if minutes is not None:
        config.max_minutes = minutes
    return config


def cli_train_sopi(args) -> int:
    if len(args.inputs) != 1:
        raise InvalidParameterError("train sopi takes exactly one CT (the patient's pre-operative CT)")
    if args.geometry is None:
        raise InvalidParameterError("train sopi needs the C-arm geometry (--geometry G.json); see "
                                    "Resources/Geometry/carm_geometry.json")
    ct_path = args.inputs[0]
    out = check_output_dir(args.output, [ct_path, args.geometry] + ([args.labels] if args.labels else []))
    geometry = read_geometry(args.geometry)
    config = config_from_args(args)
    ct = read_volume(ct_path)
    validate_ct(ct)
    labels, ids, source = None, None, "bone (HU > 200): no label map given"
    if args.labels:
        labels = read_volume(args.labels)
        table = Path(args.labels).parent / "labels.csv"
        ids = spine_label_ids(table) if table.is_file() else None
        source = (f"spine (vertebrae and sacrum, {len(ids)} labels of {table.name}) of {Path(args.labels).name}" if ids
                  else f"all non-zero labels of {Path(args.labels).name}")
    mask = structure_mask(ct, labels, ids)
    summary = run_with_progress_bar("train sopi", train_sopi, ct, mask, geometry, out, config, mask_source=source)
    v = summary["validation"]
    parts = [f"{k}: {v[k]['rotation_error_deg']:.2f}° / {v[k]['translation_error_mm']:.2f} mm, "
             f"{100 * v[k]['failure_rate']:.0f}% failures" for k in ("rtpi", "fine") if k in v]
    print(f"{run_state(summary)}: {summary['rtpi_steps']} RTPI + {summary['fine_steps']} fine steps in {summary['seconds']:.0f} s; "
          f"validation ({v['cases']} simulated X-rays) " + "; ".join(parts) + f"; model folder {out}")
    return 0
