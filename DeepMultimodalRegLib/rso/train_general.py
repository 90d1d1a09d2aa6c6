"""``deepmmreg train general``: the general deep registration model, self-supervised on real scans.

Recipe (RSO paper section 4.1, sized for 2 CPU cores): the real CT and MR scans of
``../shared/data`` are normalised (CT (HU + 1000) / 2000, MR 1st–99th percentile) and resampled to a
coarse isotropic working grid (4 mm).  Each step draws a scan and a crop of it (64³ voxels), with
the paper's augmentation (rotations up to ±0.01/±0.01/±0.05 rad about x/y/z, zoom 0.9–1.1); the
fixed image is the crop, the moving image the same crop seen through a random smooth deformation
(from a bank made by :func:`~DeepMultimodalRegLib.synthetic.smooth_random_deformation`, randomly
flipped and scaled).  For CT, CBCT-like artefacts (:mod:`.artefacts`) are added to one of the two
images.  Loss: MSE between fixed and warped moving + diffusion regulariser; Adam 3e-4 (the
paper's).  Checkpoints are written atomically; a run resumes from its checkpoint and stops after
``max_minutes``.  Validation: fixed pairs made the same way from held-out scans (abdomen-pelvis
CT, Colin27 T1), MSE and mean displacement error against the known deformation.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidParameterError
from ..fileio import atomic_output
from ..training.checkpoint import TrainingState, load_checkpoint, save_checkpoint, time_to_stop
from ..image.geometry import ImageGeometry
from ..progress import CancelToken, ProgressCallback, no_progress
from ..synthetic import smooth_random_deformation
from ..training.scans import SCANS, default_data_dir, read_scan
from ..transforms.displacement import DisplacementFieldTransform
from .artefacts import cbct_artefacts
from .losses import smoothness
from .model import RegistrationNet, count_parameters
from .prepare import normalise
from .session import make_adam
from .working_grid import to_working, warp_on_grid, working_geometry

#: scans held out for validation (never trained on)
VALIDATION_SCANS = ("pelvis_ct", "colin27_t1")


@dataclass
class GeneralTrainingConfig:
    steps: int = 4000
    spacing_mm: float = 4.0
    crop: int = 64  # voxels per axis (a multiple of 16)
    learning_rate: float = 3e-4
    smoothness_weight: float = 0.01
    max_displacement_mm: tuple = (3.0, 16.0)  # amplitude range of the random deformations
    control_spacing_mm: tuple = (60.0, 100.0)
    field_bank: int = 48  # random deformations made once and reused (flipped, scaled)
    ct_probability: float = 0.5  # share of steps on CT (one CT scan vs several MR)
    artefact_probability: float = 0.7  # CT pairs with CBCT-like artefacts on one image
    rotation_rad: tuple = (0.01, 0.01, 0.05)  # about x, y, z (the paper's augmentation)
    zoom: tuple = (0.9, 1.1)
    validation_pairs: int = 8
    validation_every: int = 250
    checkpoint_every: int = 50
    max_minutes: float | None = None
    seed: int = 0
    threads: int | None = None
    device: str = "auto"

    def check(self) -> None:
        if self.crop % 16 or self.crop < 16:
            raise InvalidParameterError(f"crop must be a multiple of 16, got {self.crop}")
        if self.steps < 1 or self.spacing_mm <= 0:
            raise InvalidParameterError("steps must be ≥ 1 and the spacing positive")


def gpu_config(seed: int = 0) -> GeneralTrainingConfig:
    """The larger configuration for a CUDA GPU: 3 mm grid, 128³ crops, more steps."""
    return GeneralTrainingConfig(steps=20000, spacing_mm=3.0, crop=128, field_bank=96, validation_every=1000,
                                 checkpoint_every=200, seed=seed, device="cuda")


def quick_config(seed: int = 0) -> GeneralTrainingConfig:
    """A few steps on small crops at a coarse grid: checks the set-up in about a minute."""
    return GeneralTrainingConfig(steps=6, spacing_mm=8.0, crop=32, field_bank=3, validation_pairs=2,
                                 validation_every=3, checkpoint_every=3, seed=seed)


# ---------------------------------------------------------------------------------- data
def prepare_scans(data_dir: Path | None, names, spacing_mm: float, cache: Path | None) -> dict[str, tuple[torch.Tensor, str]]:
    """Normalised scans on their isotropic working grid: name → ([D, H, W] tensor, modality)."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    out = {}
    for spec in SCANS:
        if spec.name not in names:
            continue
        cached = cache / f"{spec.name}_{spacing_mm:g}mm_general.pt" if cache else None
        if cached is not None and cached.exists():
            out[spec.name] = (torch.load(cached, weights_only=True), spec.modality)
            continue
        volume = read_scan(spec, data_dir)
        with torch.no_grad():
            data = to_working(normalise(volume, spec.modality), working_geometry(volume.geometry, spacing_mm))
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(cached) as tmp:
                torch.save(data.contiguous(), tmp)
        out[spec.name] = (data, spec.modality)
    return out


def field_bank(config: GeneralTrainingConfig, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` random smooth deformations on a crop grid, [3, n, n, n] in working voxels (i, j, k),
    each with the largest amplitude of the range (steps scale them down at random)."""
    n = config.crop
    grid = ImageGeometry(shape=(n, n, n), spacing=(config.spacing_mm,) * 3)
    bank = []
    rng = np.random.default_rng(seed)
    for i in range(count):
        control = float(rng.uniform(*config.control_spacing_mm))
        amplitude = min(config.max_displacement_mm[1], control / 5.5)
        transform = smooth_random_deformation(grid, amplitude, control, seed=seed * 1000 + i)
        raster = DisplacementFieldTransform.from_transform(transform, grid).field[0]  # [3, n, n, n] mm (x, y, z)
        bank.append((raster / config.spacing_mm).float())  # identity direction: mm → voxels (i, j, k)
    return bank


def _rotation(angles, zoom) -> torch.Tensor:
    ax, ay, az = angles
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float32)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float32)
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float32)
    return (rz @ ry @ rx) / zoom


def make_pair(scan: torch.Tensor, modality: str, bank: list[torch.Tensor], config: GeneralTrainingConfig,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fixed, moving) [1, 1, n, n, n] and the displacement u [1, 3, n, n, n] (voxels) with
    moving(x) = image(A x + u(x)), fixed(x) = image(A x) for a random crop and augmentation A."""
    n = config.crop
    size = torch.tensor(scan.shape[::-1], dtype=torch.float32)  # x, y, z
    low = torch.clamp(torch.full((3,), n / 2.0), max=size / 2)
    high = torch.clamp(size - n / 2.0, min=size / 2)
    centre = low + torch.rand(3, generator=generator) * (high - low)  # crop centre (x, y, z) in scan voxels
    angles = [float((2 * torch.rand(1, generator=generator) - 1) * r) for r in config.rotation_rad]
    zoom = float(config.zoom[0] + torch.rand(1, generator=generator) * (config.zoom[1] - config.zoom[0]))
    a = _rotation(angles, zoom)
    t = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
    zz, yy, xx = torch.meshgrid(t, t, t, indexing="ij")
    local = torch.stack([xx, yy, zz], dim=-1)  # [n, n, n, 3]
    base = local @ a.T + centre  # scan voxel coordinates (x, y, z) of the fixed crop
    u = bank[int(torch.randint(len(bank), (1,), generator=generator))].clone()
    for axis in range(3):  # random flips: flip the array axis and negate that component
        if float(torch.rand(1, generator=generator)) < 0.5:
            u = torch.flip(u, dims=(3 - axis,))
            u[axis] = -u[axis]
    u = u * float(config.max_displacement_mm[0] / config.max_displacement_mm[1]
                  + torch.rand(1, generator=generator) * (1 - config.max_displacement_mm[0] / config.max_displacement_mm[1]))
    # u is in crop voxels along the crop axes; in scan voxels it is a u (A maps crop steps to scan steps)
    moved = base + u.permute(1, 2, 3, 0) @ a.T
    scale = 2.0 / (size - 1)
    image = scan[None, None]
    fixed = F.grid_sample(image, (base * scale - 1)[None], align_corners=True, padding_mode="zeros")
    moving = F.grid_sample(image, (moved * scale - 1)[None], align_corners=True, padding_mode="zeros")
    if modality == "CT" and float(torch.rand(1, generator=generator)) < config.artefact_probability:
        if float(torch.rand(1, generator=generator)) < 0.5:
            fixed = cbct_artefacts(fixed[0, 0], generator)[None, None]
        else:
            moving = cbct_artefacts(moving[0, 0], generator)[None, None]
    return fixed, moving, u[None]


def true_correction(u: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """The displacement d with moving(x + d(x)) = fixed(x) when moving(x) = fixed(x + u(x)) (ignoring
    the small augmentation): the inverse field, d(x) = −u(x + d(x)), by fixed-point iteration."""
    d = torch.zeros_like(u)
    for _ in range(iterations):
        d = -warp_on_grid_vector(u, d)
    return d


def warp_on_grid_vector(field_: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    channels = [warp_on_grid(field_[:, c:c + 1], displacement) for c in range(field_.shape[1])]
    return torch.cat(channels, dim=1)


def validation_set(config: GeneralTrainingConfig, scans) -> list[tuple]:
    generator = torch.Generator().manual_seed(10_000 + config.seed)
    bank = field_bank(config, max(2, config.validation_pairs // 2), seed=10_000 + config.seed)
    names = sorted(scans)
    pairs = []
    for i in range(config.validation_pairs):
        data, modality = scans[names[i % len(names)]]
        fixed, moving, u = make_pair(data, modality, bank, config, generator)
        pairs.append((fixed, moving, true_correction(u)))
    return pairs


def evaluate(model: RegistrationNet, pairs, spacing_mm: float) -> dict:
    mse_before, mse_after, error_before, error_after = [], [], [], []
    device = next(model.parameters()).device
    with torch.no_grad():
        for fixed, moving, truth in pairs:
            fixed, moving, truth = fixed.to(device), moving.to(device), truth.to(device)
            d = model(torch.cat([fixed, moving], dim=1))
            warped = warp_on_grid(moving, d)
            body = fixed > 0.05  # error measured where there is anatomy
            mse_before.append(float(((moving - fixed) ** 2).mean()))
            mse_after.append(float(((warped - fixed) ** 2).mean()))
            lengths = lambda f: torch.linalg.norm(f, dim=1, keepdim=True)[body]  # noqa: E731
            error_before.append(float(lengths(truth).mean()) * spacing_mm)
            error_after.append(float(lengths(d - truth).mean()) * spacing_mm)
    return {"pairs": len(pairs), "mse_identity": float(np.mean(mse_before)), "mse_model": float(np.mean(mse_after)),
            "displacement_error_identity_mm": float(np.mean(error_before)),
            "displacement_error_model_mm": float(np.mean(error_after))}


# ---------------------------------------------------------------------------------- training
def train_general(out_dir: str | Path, config: GeneralTrainingConfig | None = None, data_dir=None,
                  progress: ProgressCallback | None = None, cancel: CancelToken | None = None) -> dict:
    """Train (or resume) in ``out_dir``; writes ``general.pt`` (state_dict) and ``summary.json``."""
    config = config or GeneralTrainingConfig()
    config.check()
    progress = progress or no_progress
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    train_names = [s.name for s in SCANS if s.name not in VALIDATION_SCANS]
    scans = prepare_scans(data_dir, train_names, config.spacing_mm, out / "prepared")
    held_out = prepare_scans(data_dir, VALIDATION_SCANS, config.spacing_mm, out / "prepared")
    validation = validation_set(config, held_out)
    bank = field_bank(config, config.field_bank, seed=config.seed)
    ct_names = [n for n, (_, m) in scans.items() if m == "CT"]
    mr_names = [n for n, (_, m) in scans.items() if m != "CT"]

    from ..device import resolve_device

    device = resolve_device(config.device)
    model = RegistrationNet(working_spacing_mm=config.spacing_mm).to(device)
    optimiser = make_adam(model, config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    checkpoint = out / "checkpoint.pt"
    state = load_checkpoint(checkpoint, model, optimiser, generator, TrainingState(), map_location=device)

    def checkpoint_now():
        save_checkpoint(checkpoint, model, optimiser, generator, state, config)

    started = time.perf_counter()
    seconds_before = state.seconds
    running = state.history[-1][1] if state.history else None
    model.train()
    while state.step < config.steps:
        if time_to_stop(cancel, started, config.max_minutes):
            break
        use_ct = ct_names and (not mr_names or float(torch.rand(1, generator=generator)) < config.ct_probability)
        names = ct_names if use_ct else mr_names
        data, modality = scans[names[int(torch.randint(len(names), (1,), generator=generator))]]
        fixed, moving, _u = make_pair(data, modality, bank, config, generator)
        fixed, moving = fixed.to(device), moving.to(device)
        optimiser.zero_grad(set_to_none=True)
        d = model(torch.cat([fixed, moving], dim=1))
        similarity = ((warp_on_grid(moving, d) - fixed) ** 2).mean()
        loss = similarity + config.smoothness_weight * smoothness(d)
        loss.backward()
        optimiser.step()
        state.step += 1
        value = float(similarity.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        state.seconds = seconds_before + time.perf_counter() - started
        if state.step % 10 == 0:
            state.history.append((state.step, running))
        if state.step % config.validation_every == 0 or state.step == config.steps:
            model.eval()
            state.validation.append({"step": state.step, "seconds": round(state.seconds, 1), "train_mse_running": running,
                                     **evaluate(model, validation, config.spacing_mm)})
            model.train()
        if state.step % config.checkpoint_every == 0 or state.step == config.steps:
            checkpoint_now()
        progress(state.step / config.steps, f"step {state.step} mse {running:.5f}")
    checkpoint_now()
    model.eval()
    if not state.validation or state.validation[-1]["step"] != state.step:
        state.validation.append({"step": state.step, "seconds": round(state.seconds, 1), "train_mse_running": running,
                                 **evaluate(model, validation, config.spacing_mm)})
    weights = out / "general.pt"
    with atomic_output(weights) as tmp:  # float16: half the size; loaded back as float32
        torch.save({k: (v.half() if v.is_floating_point() and k != "working_spacing_mm" else v).cpu()
                    for k, v in model.state_dict().items()}, tmp)
    summary = {"steps": state.step, "finished": state.step >= config.steps, "seconds": round(state.seconds, 1),
               "parameters": count_parameters(model), "config": asdict(config), "train_scans": sorted(scans),
               "validation_scans": list(VALIDATION_SCANS), "final_validation": state.validation[-1],
               "validation": state.validation, "train_mse_running": running, "threads": torch.get_num_threads(),
               "history": state.history, "device": str(device)}
    with atomic_output(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary


def cli_train_general(args) -> int:
    """``deepmmreg train general -o DIR [--steps N] [--minutes M] [--quick] [--seed S] [--data-dir D]``."""
    from ..fileio import check_output_dir
    from ..training.budget_args import run_state, run_with_progress_bar

    out = check_output_dir(args.output)
    from ..device import resolve_device

    device = resolve_device(args.device)
    if args.quick:
        config = quick_config(args.seed)
    elif device.type == "cuda":
        config = gpu_config(args.seed)
    else:
        config = GeneralTrainingConfig(seed=args.seed)
    config.device = str(device)
    if args.steps:
        config.steps = args.steps
    if getattr(args, "learning_rate", None) is not None:
        config.learning_rate = args.learning_rate
    config.max_minutes = args.minutes
    summary = run_with_progress_bar("train general", train_general, out, config, data_dir=args.data_dir)
    v = summary["final_validation"]
    print(f"{run_state(summary)} at step {summary['steps']} after {summary['seconds']:.0f} s: held-out MSE "
          f"{v['mse_identity']:.5f} -> {v['mse_model']:.5f}, displacement error {v['displacement_error_identity_mm']:.2f}"
          f" -> {v['displacement_error_model_mm']:.2f} mm on {v['pairs']} pairs; weights {out / 'general.pt'}")
    return 0
