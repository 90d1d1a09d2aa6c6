"""Command-line steps of the deep session: ``deepmmreg refine`` (ISO / RSO from a saved session)."""

from __future__ import annotations

import json

from ..errors import InvalidParameterError


def cmd_refine(args) -> int:
    """``deepmmreg refine FIXED MOVING --init DIR -o OUT --mode iso|rso [--roi ...] [--iterations N]``."""
    from ..fileio import check_output_dir
    from ..image.io import read_volume
    from ..progress import CancelToken, TqdmProgress
    from ..region import Box
    from .session import DeepRegistrationSession

    out = check_output_dir(args.output, [args.fixed, args.moving])
    if args.iterations is not None and args.iterations < 1:
        raise InvalidParameterError(f"--iterations must be at least 1, got {args.iterations}")
    box = Box(tuple(args.roi[:3]), tuple(args.roi[3:])) if args.roi is not None else None
    fixed = read_volume(args.fixed)
    moving = read_volume(args.moving)
    overrides = {"fine_similarity": args.rso_similarity} if getattr(args, "rso_similarity", None) else {}
    session = DeepRegistrationSession.load(args.init, fixed, moving, device=args.device, **overrides)
    bar = TqdmProgress(f"refine {args.mode}")
    try:
        if args.mode == "iso":
            result = session.iso(args.iterations or 100, progress=bar, cancel=CancelToken())
        else:
            if box is None:
                raise InvalidParameterError("--mode rso needs --roi cx,cy,cz,sx,sy,sz (box centre and size, fixed LPS mm)")
            result = session.rso(box, args.iterations or 400, progress=bar, cancel=CancelToken(),
                                 spacing_mm=getattr(args, "rso_spacing", None))
    finally:
        bar.close()
    paths = result.save(out, protected=[args.fixed, args.moving])
    paths["session"] = session.save(out)
    f = result.figures
    summary = {"step": f.get("kind")}
    if "loss_before" in f:
        summary.update(loss_before=f["loss_before"], loss_after=f["loss_after"])
    if "refine_spacing_mm" in f:
        summary.update(refine_spacing_mm=f["refine_spacing_mm"])
    if "in_box_loss_before" in f:
        summary.update(in_box_loss_before=f["in_box_loss_before"], in_box_loss_after=f["in_box_loss_after"])
    for message in f.get("warnings", []):
        print(f"warning: {message}")
    print(json.dumps({**{k: str(v) for k, v in paths.items()}, **summary}, indent=2))
    return 0
