"""``deepmmreg``: register, refine, 2D/3D, DRR, apply, demo, models, train.

Errors the user can fix (the library's :class:`DeepMMRegError`) print one line and exit with 2;
argument errors also exit with 2 (argparse); success is 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from .. import __version__
from ..errors import DeepMMRegError, InvalidParameterError, NotAvailableError
from ..methods.registry import METHODS

EXIT_USER_ERROR = 2

REGISTER_METHODS = tuple(METHODS)  # the catalogue is import-light: runners load on first use
METHODS_2D3D = ("sopi", "sopi+opt", "opt-gc", "opt-ncc", "opt-ngi")
TRAINABLE = ("disa", "general", "msode", "sopi", "translation")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepmmreg", description="Deep-learning multimodal image registration "
                                "(DISA-LC², RSO, SOPI, MS-ODE). Physical space is LPS mm; transforms map fixed "
                                "points to moving points, as ITK and Slicer resample.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("register", help="register a moving volume to a fixed volume")
    r.add_argument("fixed", type=Path)
    r.add_argument("moving", type=Path)
    r.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    r.add_argument("--method", required=True, choices=REGISTER_METHODS)
    r.add_argument("--search", choices=("local", "global"), default="local")
    _device_and_seed(r)
    r.add_argument("--fixed-mask", type=Path)
    r.add_argument("--moving-mask", type=Path)
    r.add_argument("--starts", type=int, help="global search: number of random starts (default 500)")
    r.add_argument("--range-deg", type=float,
                   help="global search: rotations within ±this about each axis (disa-/mind-*: default 40, the paper's brain "
                        "range is 10; msode-rigid|hybrid: a grid of starts every ≤ 50° within ±this, default 50 = 27 starts)")
    r.add_argument("--range-mm", type=float,
                   help="global search: translations within ±this along each axis (default 150; brain: 25)")
    r.add_argument("--refine", choices=("disa", "mind", "none"),
                   help="disa-*: after the DISA rigid search, polish the pose locally: disa (the default) = on DISA "
                        "descriptors of the moving image resampled at the found pose (removes the drift of DISA's "
                        "optimum when the images are turned far apart; a global search also spreads its starts over "
                        "turned copies of the fixed image); mind = on MIND-SSC features (also used for the "
                        "affine/deformable stages); none = the DISA search's pose as it is (fastest)")
    # the engine's AFFINE_WEIGHTINGS, spelled out to keep --help free of the torch-heavy engine (tested)
    r.add_argument("--affine-weighting", choices=("support", "variance"),
                   help="disa-/mind-affine|deformable: weights of the affine stage: support = equal wherever the fixed "
                        "image has structure (the default on DISA features: variance weights let the head's rim set "
                        "the scale), variance = LC²'s local variance (the default on MIND-SSC features)")
    # the engine's DENSE_DESCRIPTOR_STRIDES, spelled out for the same reason (tested)
    r.add_argument("--dense-descriptor-stride", type=int, choices=(2, 4),
                   help="disa-deformable: DISA descriptors of the dense stage every 2 (the default: 4 mm, the network "
                        "run a trous) or 4 voxels (8 mm, as the linear stages use)")
    # --- rso (issue 5)
    r.add_argument("--weights", type=Path, help="deep: general-model weights (default: the shipped `general`); msode-*: a trained MS-ODE model "
                        "(default for msode-rigid: the shipped msode_rigid; for msode-bspline and msode-hybrid's "
                        "deformable stage, while no trained B-spline model ships: an untrained MIND-SSC gradient flow, "
                        "python -m DeepMultimodalRegLib.training.msode_flow OUT.pt writes it to a file; msode-dense "
                        "needs a file; msode-hybrid: the B-spline model of its deformable stage, after the shipped "
                        "rigid model)")
    r.add_argument("--working-spacing", type=float, help="deep: working grid spacing in mm (default: the model's)")
    r.add_argument("--similarity", choices=("auto", "mse", "ncc", "disa"),
                   help="deep: loss of ISO/RSO (default auto: mse for same-modality pairs, ncc otherwise; disa = "
                        "DISA descriptors, for multimodal pairs)")
    # --- end rso
    # --- msode (issue 8)
    r.add_argument("--ode-solvers", help="msode-*: solvers per level in the paper's notation, e.g. "
                   "'A(1e-3)-A(1e-3)-F(0.1)' (default: the model's)")
    # --- end msode

    f = sub.add_parser("refine", help="refine a deep registration: whole image (iso) or inside a box (rso)")
    f.add_argument("fixed", type=Path)
    f.add_argument("moving", type=Path)
    f.add_argument("--init", type=Path, required=True, help="output folder of `register --method deep`")
    f.add_argument("-o", "--output", type=Path, required=True)
    f.add_argument("--mode", choices=("iso", "rso"), required=True)
    f.add_argument("--roi", type=_roi, help="box centre and size in fixed-image LPS mm: cx,cy,cz,sx,sy,sz")
    f.add_argument("--iterations", type=int)
    f.add_argument("--rso-spacing", type=float,
                   help="rso: spacing (mm) of the local grid around the box; finer than the working grid refines the "
                        "current registration there (default: chosen per box, down to the fixed image's spacing)")
    f.add_argument("--rso-similarity", choices=("mse", "ncc", "disa"),
                   help="rso: similarity of steps on that finer grid, kept for later steps (default: ncc when the "
                        "session registers with mse, else the session's own)")
    _device_and_seed(f)

    x = sub.add_parser("register2d3d", help="register a CT to an X-ray (2D/3D)")
    x.add_argument("ct", type=Path)
    x.add_argument("xray", type=Path)
    x.add_argument("--geometry", type=Path, required=True, help="C-arm geometry JSON")
    x.add_argument("-o", "--output", type=Path, required=True)
    x.add_argument("--method", choices=METHODS_2D3D,
                   help="default: sopi+opt with --model (0%% failures on both benchmark CTs; SOPI alone is fast "
                        "but not yet accurate after CPU-sized training, docs/benchmarks.md), else opt-gc")
    x.add_argument("--model", type=Path, help="folder of per-patient SOPI networks")
    # --- SOPI 2D/3D (issue 7): options of the optimisation baselines ---
    x.add_argument("--init-pose", type=_floats(6), default=(0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
                   help="start pose rx,ry,rz,tx,ty,tz in degrees and mm (default: the nominal AP view, 0,...,0)")
    x.add_argument("--starts", type=int, help="opt-*: random poses scored by the global sampling (default 96)")
    # --- end SOPI 2D/3D ---
    _device_and_seed(x)

    d = sub.add_parser("drr", help="render a digitally reconstructed radiograph of a CT")
    d.add_argument("ct", type=Path)
    d.add_argument("--geometry", type=Path, required=True)
    d.add_argument("--pose", type=_floats(6), required=True, help="rx,ry,rz,tx,ty,tz in degrees and mm")
    d.add_argument("-o", "--output", type=Path, required=True)
    _device_and_seed(d)

    a = sub.add_parser("apply", help="resample a moving image with a transform file onto a reference grid")
    a.add_argument("transform", type=Path, help=".tfm/.h5 ITK transform or displacement-field image")
    a.add_argument("moving", type=Path)
    a.add_argument("--reference", type=Path, required=True, help="image whose grid the output takes")
    a.add_argument("-o", "--output", type=Path, required=True)
    a.add_argument("--interpolation", choices=("linear", "nearest"), default=None,
                   help="default: nearest for integer label images, linear otherwise")
    a.add_argument("--default-value", type=float, default=0.0, help="value outside the moving image (default 0)")
    a.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")

    m = sub.add_parser("demo", help="run the available methods on the embedded sample and write a report")
    m.add_argument("-o", "--output", type=Path, default=Path("demo_output"))
    m.add_argument("--methods", type=_method_list, default=None,
                   help="comma-separated methods to run (default: disa-rigid,disa-affine,mind-rigid)")
    m.add_argument("--deep", action="store_true",
                   help="also run the interactive deep workflow (general → ISO → RSO) on the sample chest CT "
                        "with a known deformation (a few minutes on a CPU)")
    m.add_argument("--iso", type=int, default=100, help="ISO iterations of the --deep workflow (default 100)")
    m.add_argument("--rso", type=int, default=400, help="RSO iterations of the --deep workflow (default 400)")
    _device_and_seed(m)

    s = sub.add_parser("models", help="list the shipped networks")
    s.add_argument("--json", action="store_true")

    t = sub.add_parser("train", help="train a network with this project's recipes (resumes in -o DIR)")
    t.add_argument("what", choices=TRAINABLE)
    t.add_argument("inputs", nargs="*", type=Path)
    t.add_argument("-o", "--output", type=Path, required=True)
    t.add_argument("--geometry", type=Path)
    t.add_argument("--data-dir", type=Path, help="folder of the training scans (default: ../shared/data)")
    t.add_argument("--steps", type=int, help="optimiser steps (default: the recipe's)")
    t.add_argument("--minutes", type=float, help="stop after this wall time, checkpointed; run again to resume")
    t.add_argument("--quick", action="store_true", help="a few steps on small crops, to check the set-up")
    t.add_argument("--init-weights", help="disa: fine-tune from these weights (a state_dict file)")
    t.add_argument("--aligned-probability", type=float, help="disa: chance that co-registered crops are aligned")
    t.add_argument("--aligned-jitter", type=int, help="disa: shift of aligned crops, voxels per axis (max)")
    t.add_argument("--learning-rate", type=float, help="disa: peak learning rate; msode, translation: Adam's rate")
    t.add_argument("--warmup-steps", type=int, help="disa: learning-rate warm-up steps")
    t.add_argument("--crop-pairs-per-step", type=int,
                   help="disa: crop pairs per optimiser step (default 1; a GPU affords many more)")
    t.add_argument("--loss-weighting", choices=("t-sampling", "bins"),
                   help="disa: weight of each patch pair in the loss (default bins: equal weight per target bin, "
                        "pooled over anchors; t-sampling: the paper's sampler in expectation, anchor by anchor)")
    t.add_argument("--sign-symmetric", action="store_true", default=None,
                   help="disa: train the descriptors registration uses, the mean over each crop and its negative")
    t.add_argument("--output-init-scale", type=float,
                   help="disa, from scratch: multiply the last layer's initial weights by this (default 1; ~8 starts "
                        "the descriptors near norm 1 instead of ~0.1)")
    t.add_argument("--synthetic-probability", type=float,
                   help="disa: share of steps that train on two label-driven synthetic contrasts of one labelled "
                        "scan at the same place (default 0: real scan pairs only)")
    t.add_argument("--distil-steps", type=int,
                   help="disa: first regress the descriptors onto a teacher embedding (symmetric LC² against "
                        "landmark patches, mapped to 16 dimensions) for this many steps, then the paper's pairwise "
                        "loss (default 0)")
    t.add_argument("--teacher-landmarks", type=int, help="disa: landmark patches of that teacher (default 384)")
    t.add_argument("--distil-rotation-deg", type=float,
                   help="disa: half of the distillation crops turn by U(±this)° per axis, their targets following "
                        "the anatomy (default 0: upright only; 45 did not help in a short check)")
    # --- msode (issue 8)
    t.add_argument("--kind", choices=("rigid", "bspline", "dense"), default="rigid",
                   help="msode: the parameterisation to train (default rigid)")
    t.add_argument("--motion-deg", type=float, help="msode: simulated rotations U(±this) per axis (default 75, the paper's)")
    t.add_argument("--motion-mm", type=float, help="msode: simulated translations U(±this) mm (default 20, the paper's)")
    t.add_argument("--grid-size", type=int, help="msode: working grid voxels per axis (default 48)")
    t.add_argument("--grid-spacing", type=float, help="msode: working grid spacing in mm (default 5)")
    t.add_argument("--similarity", choices=("mind", "disa", "content"),
                   help="msode: L_sim (default mind; content = the paper's learned content features, the shipped "
                        "msode_translation encoder)")
    t.add_argument("--gradient-input", action="store_true",
                   help="msode rigid|bspline: f also sees the MIND-SSC descent direction and starts as a gradient flow "
                        "(not in the paper; see docs/benchmarks.md)")
    t.add_argument("--descent-rate", type=float,
                   help="msode --gradient-input: the flow's rate P (default rigid 2e4, bspline 1e5; calibrated at "
                        "32^3 x 8 mm by benchmarks/msode_descent_rate.py)")
    t.add_argument("--ode-solvers", help="msode: solvers per level used in training and kept for registration, "
                   "e.g. F(0.2)-F(0.2)-F(0.1) (default: trains with F(0.25)-F(0.5)-F(1), registers with the paper's)")
    # --- end msode
    t.add_argument("--labels", type=Path, help="sopi: the CT's label map (same grid); its spine (from a labels.csv "
                   "beside it) or all its labels give the structure mask (default: bone by HU)")
    _device_and_seed(t)
    return p


def _device_and_seed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--seed", type=int, default=0)


def _floats(n: int):
    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {text!r}")
        if len(values) != n:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {len(values)}")
        return values
    return parse


def _roi(text: str) -> tuple[float, ...]:
    values = _floats(6)(text)
    if min(values[3:]) <= 0:
        raise argparse.ArgumentTypeError("ROI size must be positive")
    return values


# ---------------------------------------------------------------------------------- commands
def cmd_apply(args) -> int:
    from ..device import check_memory, resolve_device
    from ..image.io import read_image_sitk, read_volume, write_volume
    from ..image.geometry import ImageGeometry
    from ..image.validation import require_finite
    from ..fileio import check_output_path
    from ..transforms.itk_io import read_transform
    from ..transforms.resample import warp_volume

    out = check_output_path(args.output, [args.transform, args.moving, args.reference])
    device = resolve_device(args.device)
    transform = read_transform(args.transform)
    moving = read_volume(args.moving)
    require_finite(moving, "moving")
    reference = ImageGeometry.from_sitk(read_image_sitk(args.reference))
    check_memory(reference.voxel_count() * 4 * 24, device, "resampling")
    interpolation = args.interpolation or ("linear" if moving.data.is_floating_point() else "nearest")
    warped = warp_volume(moving.to(device), transform.to(device), reference, interpolation, args.default_value)
    write_volume(warped.to("cpu"), out, protected=[args.transform, args.moving, args.reference])
    print(f"wrote {out}")
    return 0


def cmd_register(args) -> int:
    from ..fileio import check_output_dir
    from ..image.io import read_volume
    from ..image.validation import validate_registration_input
    from ..methods.registry import RegistrationOptions, get_method
    from ..progress import CancelToken, TqdmProgress

    info = get_method(args.method)  # fails fast if the method is not available
    out = check_output_dir(args.output, [args.fixed, args.moving])
    fixed = read_volume(args.fixed)
    moving = read_volume(args.moving)
    validate_registration_input(fixed, "fixed", method=args.method)
    validate_registration_input(moving, "moving", method=args.method)
    masks = {k: read_volume(getattr(args, k)) if getattr(args, k) else None for k in ("fixed_mask", "moving_mask")}
    bar = TqdmProgress(args.method)
    try:
        extra = {k: getattr(args, k) for k in ("starts", "range_deg", "range_mm", "refine", "affine_weighting",
                                               "dense_descriptor_stride")
                 if getattr(args, k, None) is not None}
        # --- rso (issue 5): deep-method settings
        if getattr(args, "weights", None) is not None:
            extra["weights"] = str(args.weights)
        if getattr(args, "working_spacing", None) is not None:
            extra["working_spacing_mm"] = args.working_spacing
        if getattr(args, "similarity", None) is not None:
            extra["similarity"] = args.similarity
        # --- end rso
        # --- msode (issue 8)
        if getattr(args, "ode_solvers", None):
            extra["solvers"] = args.ode_solvers
        # --- end msode
        result = info.runner(fixed, moving, RegistrationOptions(search=args.search, device=args.device, seed=args.seed,
                                                                progress=bar, cancel=CancelToken(), extra=extra,
                                                                **masks))
    finally:
        bar.close()
    paths = result.save(out, protected=[args.fixed, args.moving])
    # --- rso (issue 5): the deep method's session, so `deepmmreg refine --init OUT` can continue
    if getattr(result, "session", None) is not None:
        paths["session"] = result.session.save(out)
    # --- end rso
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def _method_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    return names


def cmd_demo(args) -> int:
    from ..demo import run_demo
    from ..progress import TqdmProgress

    bar = TqdmProgress("demo")
    try:
        summary = run_demo(args.output, device=args.device, seed=args.seed, progress=bar, methods=args.methods,
                           deep=args.deep, deep_iterations=(args.iso, args.rso))
    finally:
        bar.close()
    for e in summary["results"]:
        if "error" in e:
            print(f"{e['method']:<34} not run: {e['error']}")
        else:
            print(f"{e['method']:<34} mean TRE {e['tre']['mean_mm']:6.2f} mm   {e.get('seconds', 0):6.1f} s")
    deep = summary.get("deep_interactive")
    if deep and "error" in deep:
        print(f"interactive deep workflow not run: {deep['error']}")
    elif deep:
        for step, e in deep["in_box"].items():
            print(f"deep {step:<29} in-box RMSE {e['rmse_hu']:6.0f} HU   displacement error "
                  f"{e['displacement_error_mm']:5.2f} mm   {e['seconds']:6.1f} s")
    print(f"report: {Path(args.output) / 'index.html'}")
    return 0


def cmd_models(args) -> int:
    from ..weights.manifest import load_manifest

    entries = load_manifest()
    if args.json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
        return 0
    if not entries:
        print("no networks are shipped in this version yet")
    for e in entries:
        print(f"{e.name:<24} {e.method:<10} {e.parameters:>10,d} params  sha256 {e.sha256[:16]}…  {e.file}  card: {e.card}")
        if e.status:
            print(f"{'':<24} status: {e.status}")
    return 0


def cmd_train(args) -> int:
    # --- rso (issue 5)
    if args.what == "general":
        from ..rso.train_general import cli_train_general

        return cli_train_general(args)
    # --- end rso
    # --- msode (issue 8)
    if args.what == "msode":
        from ..training.msode_cli import cli_train_msode

        return cli_train_msode(args)
    if args.what == "translation":  # the translation model behind MS-ODE's learned similarity
        from ..training.translation_cli import cli_train_translation

        return cli_train_translation(args)
    # --- end msode
    if args.what == "sopi":
        from ..training.sopi_cli import cli_train_sopi

        return cli_train_sopi(args)
    if args.what != "disa":
        return cmd_not_available(args)
    from ..training.disa_cli import cli_train_disa

    return cli_train_disa(args)


# --- SOPI 2D/3D (issue 7): drr and register2d3d ---
def cmd_drr(args) -> int:
    from ..fileio import check_output_path
    from ..image.io import read_volume
    from ..sopi.geometry import read_geometry
    from ..sopi.register import render_drr, validate_ct
    from ..sopi.xray import write_drr

    out = check_output_path(args.output, [args.ct, args.geometry])
    geometry = read_geometry(args.geometry)
    ct = read_volume(args.ct)
    validate_ct(ct)
    drr = render_drr(ct, geometry, args.pose, device=args.device)
    write_drr(drr, geometry, out, protected=[args.ct, args.geometry])
    print(f"wrote {out}")
    return 0


def cmd_register2d3d(args) -> int:
    from ..fileio import check_output_dir
    from ..image.io import read_volume
    from ..progress import CancelToken, TqdmProgress
    from ..sopi.geometry import read_geometry
    from ..sopi.optimize import OptimizerSettings
    from ..sopi.register import register_2d3d, require_method_available
    from ..sopi.xray import fit_geometry_to_xray, read_xray

    if args.method is None:
        args.method = "sopi+opt" if args.model else "opt-gc"
    require_method_available(args.method, args.model)  # sopi / sopi+opt without --model fail before reading
    out = check_output_dir(args.output, [args.ct, args.xray, args.geometry])
    geometry = read_geometry(args.geometry)
    xray, dicom_geometry = read_xray(args.xray)
    if dicom_geometry is not None and abs(dicom_geometry.source_to_detector_mm - geometry.source_to_detector_mm) > 1:
        logging.getLogger(__name__).warning(
            "the X-ray's DICOM tags give a source-to-detector distance of %.1f mm, the geometry file %.1f mm; "
            "using the geometry file", dicom_geometry.source_to_detector_mm, geometry.source_to_detector_mm)
    geometry = fit_geometry_to_xray(geometry, tuple(xray.shape))
    ct = read_volume(args.ct)
    settings = OptimizerSettings()
    if args.starts is not None:
        if args.starts < 0:
            raise InvalidParameterError(f"--starts must be ≥ 0, got {args.starts}")
        settings.starts = args.starts
    bar = TqdmProgress(args.method)
    try:
        result = register_2d3d(ct, xray, geometry, args.method, init_pose=args.init_pose, settings=settings,
                               device=args.device, seed=args.seed, progress=bar, cancel=CancelToken(),
                               ct_name=ct.name, xray_name=Path(args.xray).name, model_dir=args.model)
    finally:
        bar.close()
    paths = result.save(out, protected=[args.ct, args.xray, args.geometry])
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0
# --- end SOPI 2D/3D ---


def cmd_refine(args) -> int:  # rso (issue 5)
    from ..rso.cli import cmd_refine as run_refine

    return run_refine(args)


def cmd_not_available(args) -> int:
    what = {"refine": "interactive refinement (ISO/RSO)", "register2d3d": "2D/3D registration (SOPI)",
            "drr": "DRR rendering", "train": f"training '{getattr(args, 'what', '')}'"}[args.command]
    raise NotAvailableError(f"{what} is not available yet in this version")


COMMANDS = {"apply": cmd_apply, "register": cmd_register, "demo": cmd_demo, "models": cmd_models,
            "refine": cmd_refine, "register2d3d": cmd_register2d3d, "drr": cmd_drr,
            "train": cmd_train}


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # run as a program (not called from Python): large tensors reuse freed heap memory
        from ..heap_reuse import reuse_freed_memory

        reuse_freed_memory()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.command == "refine" and args.mode == "rso" and args.roi is None:
        parser.error("--mode rso needs --roi cx,cy,cz,sx,sy,sz")
    try:
        return COMMANDS[args.command](args)
    except DeepMMRegError as exc:
        print(f"deepmmreg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"deepmmreg {args.command}: cancelled; no output was changed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
