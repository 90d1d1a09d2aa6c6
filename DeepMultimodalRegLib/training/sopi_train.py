"""``deepmmreg train sopi CT --geometry G.json -o MODEL_DIR``: per-patient SOPI networks.

The clinical route with one pre-operative CT: both networks are trained on DRRs of that CT only
(paper section 3.2, sized for 2 CPU cores):

1. **RTPI** (:mod:`..sopi.rtpi`): X-ray-like images (:mod:`.sopi_data`) at poses from the paper's
   distribution; loss α·(1 − GD(X-ray, DRR at the predicted pose)) + β·MSE(predicted, true pose in
   standard deviations) + λ·mean(predicted pose²) with α = 1, β = 1, λ = 0.01 (eq. 5).  The GD term's
   DRR is rendered on a coarser detector and CT (``similarity_size``, ``similarity_ct_mm``): it is
   the only term that back-propagates through the projector, and on a CPU that backward pass would
   otherwise cost more than everything else in a step.
2. **Fine stage** (:mod:`..sopi.fine`): pairs (θ, θ_t) with θ_t from the same distribution and θ =
   θ_t + an offset N(0, ``fine_offset_sigma``) scaled by U(0.1, 1) per pair (small and large offsets
   both occur: the stage must refine from RTPI's errors down to the 3°/3 mm criterion); loss eq. 7.

Adam with a triangular cyclic learning rate (between lr/10 and lr, period 100 steps — the paper's
cyclic schedule, with Adam instead of SGD for the short budget).  The wall-time budget is split
between the stages (``rtpi_share``); the run checkpoints (:mod:`.checkpoint`) and resumes.  At the
end both networks are validated on X-rays from the benchmark's simulator (another attenuation model,
noise, blur, gamma; fixed seed) at poses never used in training, and the model folder is written
(:mod:`..sopi.model_dir`): weights, structure mask, spec, SHA-256 sums and a model card.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..fileio import atomic_output
from ..image.volume import Volume
from ..metrics.similarity2d import gradient_difference
from ..progress import CancelToken, ProgressCallback, no_progress
from ..sopi.drr import DRRProjector
from ..sopi.fine import FineConfig, FineNet, FineSettings, fine_training_loss, refine_pose
from ..sopi.geometry import CarmGeometry
from ..sopi.model_dir import ct_fingerprint, save_model_dir
from ..sopi.optimize import coarsen_ct
from ..sopi.patient import PatientKit
from ..sopi.pose import pose_errors
from ..sopi.rtpi import RTPIConfig, RTPINet
from ..sopi.simulate import simulate_xray
from .checkpoint import load_checkpoint, save_checkpoint, time_to_stop
from .sopi_data import PAPER_SIGMA, sample_poses, xray_like


@dataclass
class SopiTrainingConfig:
    detector: int = 64  # model detector pixels per side (the geometry's physical detector, resampled)
    ct_mm: float = 4.0  # CT voxel size for the DRRs
    ct_cube: int = 32  # CT cube of the RTPI 3D branch
    similarity_size: int = 32  # detector of the GD term's DRR
    similarity_ct_mm: float = 8.0
    rtpi_steps: int = 4000
    fine_steps: int = 2000
    rtpi_batch: int = 8
    fine_batch: int = 4
    rtpi_lr: float = 1e-3
    fine_lr: float = 5e-4
    alpha: float = 1.0
    beta: float = 1.0
    lam: float = 0.01
    sigma: tuple = PAPER_SIGMA
    fine_offset_sigma: tuple = (10.0, 10.0, 10.0, 20.0, 15.0, 15.0)
    rtpi_width: int = 16
    fine_width: int = 8
    rtpi_share: float = 0.55  # of max_minutes spent on RTPI before the fine stage starts
    max_minutes: float | None = None
    validation_cases: int = 8
    fine_iterations: int = 12  # validation's fine steps (FineSettings' default)
    checkpoint_every: int = 50
    seed: int = 0
    threads: int | None = None


@dataclass
class SopiTrainingState:
    stage: str = "rtpi"
    rtpi_step: int = 0
    fine_step: int = 0
    seconds: float = 0.0
    rtpi_seconds: float = 0.0
    rtpi_history: list = field(default_factory=list)  # (step, loss, gd, mse) running averages
    fine_history: list = field(default_factory=list)  # (step, eq7, l_n) running averages


class SopiNetworks(nn.Module):
    """Both networks under one module, so one checkpoint holds the whole run."""

    def __init__(self, config: SopiTrainingConfig) -> None:
        super().__init__()
        self.rtpi = RTPINet(RTPIConfig(image_size=config.detector, ct_size=config.ct_cube, width=config.rtpi_width))
        self.fine = FineNet(FineConfig(image_size=config.detector, width=config.fine_width))


def cyclic_lr(step: int, peak: float, period: int = 100) -> float:
    phase = (step % period) / period
    return peak * (0.1 + 0.9 * (1 - abs(2 * phase - 1)))


def rtpi_loss(nets: SopiNetworks, kit: PatientKit, similarity: DRRProjector, config: SopiTrainingConfig,
              generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    sigma = torch.tensor(config.sigma, dtype=torch.float64)
    truth = sample_poses(generator, config.rtpi_batch, kit.projector, config.sigma)
    xrays = xray_like(kit, truth, generator)
    predicted = nets.rtpi(kit.ct_cube, xrays[:, None]).double()  # in standard deviations
    mse = ((predicted - truth / sigma) ** 2).mean()
    regulariser = (predicted ** 2).mean()
    small = torch.nn.functional.interpolate(xrays[:, None], size=similarity.shape, mode="area")[:, 0]
    drr = similarity.render(predicted * sigma)
    gd = gradient_difference(small, drr).mean()
    loss = config.alpha * (1 - gd) + config.beta * mse + config.lam * regulariser
    return loss, {"loss": loss.item(), "gd": gd.item(), "mse": mse.item()}


def fine_loss(nets: SopiNetworks, kit: PatientKit, config: SopiTrainingConfig,
              generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    truth = sample_poses(generator, config.fine_batch, kit.projector, config.sigma)
    scale = 0.1 + 0.9 * torch.rand(config.fine_batch, 1, generator=generator, dtype=torch.float64)
    sigma = torch.tensor(config.fine_offset_sigma, dtype=torch.float64) * scale
    start = sample_poses(generator, config.fine_batch, kit.projector, sigma, center=truth)
    xrays = xray_like(kit, truth, generator)
    return fine_training_loss(nets.fine, kit.render, kit.mask_render, xrays, start, truth)


@torch.no_grad()
def validate(nets: SopiNetworks, kit: PatientKit, config: SopiTrainingConfig, fine: bool) -> dict:
    """Pose errors of RTPI (and RTPI + fine stage) on simulated X-rays at fixed held-out poses."""
    generator = torch.Generator().manual_seed(90_000 + config.seed)
    truth = sample_poses(generator, config.validation_cases, kit.projector, config.sigma)
    sigma = torch.tensor(config.sigma, dtype=torch.float64)
    nets.eval()
    rows = []
    for i in range(config.validation_cases):
        xray = simulate_xray(kit.ct, kit.geometry, truth[i].numpy(), seed=1000 + i)
        start = nets.rtpi(kit.ct_cube, xray[None, None]).double()[0] * sigma
        row = dict(zip(("rtpi_rot", "rtpi_trans"), (float(e[0]) for e in pose_errors(start, truth[i]))))
        if fine:
            pose, _ = refine_pose(nets.fine, kit.render, kit.mask_render, xray, start,
                                  FineSettings(iterations=config.fine_iterations))
            row.update(zip(("fine_rot", "fine_trans"), (float(e[0]) for e in pose_errors(pose, truth[i]))))
        rows.append(row)
    nets.train()
    out = {"cases": len(rows)}
    for prefix in ("rtpi", "fine") if fine else ("rtpi",):
        rot = np.array([r[f"{prefix}_rot"] for r in rows])
        trans = np.array([r[f"{prefix}_trans"] for r in rows])
        out[prefix] = {"rotation_error_deg": float(rot.mean()), "translation_error_mm": float(trans.mean()),
                       "median_rotation_error_deg": float(np.median(rot)),
                       "median_translation_error_mm": float(np.median(trans)),
                       "failure_rate": float(np.mean((rot > 3) | (trans > 3)))}
    return out


def train_sopi(ct: Volume, mask: Volume, geometry: CarmGeometry, out_dir: str | Path,
               config: SopiTrainingConfig | None = None, progress: ProgressCallback | None = None,
               cancel: CancelToken | None = None, mask_source: str = "") -> dict:
    """Train (or resume) per-patient SOPI networks in ``out_dir``; returns the summary."""
    config = config or SopiTrainingConfig()
    progress = progress or no_progress
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)  # network initialisation
    model_geometry = geometry.resized(config.detector)
    kit = PatientKit.build(ct, mask, model_geometry, config.ct_mm, config.detector // 4, config.ct_cube, with_bone=True)
    ct_small = coarsen_ct(ct.float(), config.similarity_ct_mm)
    similarity = DRRProjector(ct_small, geometry.resized(config.similarity_size),
                              step_mm=min(ct_small.geometry.spacing))
    nets = SopiNetworks(config)
    optimiser = torch.optim.Adam([{"params": nets.rtpi.parameters(), "lr": config.rtpi_lr},
                                  {"params": nets.fine.parameters(), "lr": config.fine_lr}])
    generator = torch.Generator().manual_seed(config.seed)
    checkpoint = out / "checkpoint.pt"
    state = load_checkpoint(checkpoint, nets, optimiser, generator, SopiTrainingState())
    if state.stage == "done" and state.fine_step < config.fine_steps:  # resumed with more fine steps asked for
        state.stage = "fine"  # (RTPI is not reopened once the fine stage has begun)
    started, seconds_before = time.perf_counter(), state.seconds
    running: dict = {}
    total = config.rtpi_steps + config.fine_steps

    def smooth(values: dict) -> dict:
        for k, v in values.items():
            running[k] = v if k not in running else 0.95 * running[k] + 0.05 * v
        return dict(running)

    while state.stage != "done":
        if time_to_stop(cancel, started, config.max_minutes):
            break
        state.seconds = seconds_before + time.perf_counter() - started
        if state.stage == "rtpi" and (state.rtpi_step >= config.rtpi_steps or (
                config.max_minutes and state.seconds >= 60 * config.rtpi_share * config.max_minutes)):
            state.stage, state.rtpi_seconds = "fine", state.seconds
            running.clear()
        if state.stage == "fine" and state.fine_step >= config.fine_steps:
            state.stage = "done"
            break
        optimiser.zero_grad(set_to_none=True)
        if state.stage == "rtpi":
            optimiser.param_groups[0]["lr"] = cyclic_lr(state.rtpi_step, config.rtpi_lr)
            loss, values = rtpi_loss(nets, kit, similarity, config, generator)
            _clipped_step(optimiser, loss, nets.rtpi)
            state.rtpi_step += 1
            avg = smooth(values)
            if state.rtpi_step % _every(config.rtpi_steps) == 0:
                state.rtpi_history.append((state.rtpi_step, avg["loss"], avg["gd"], avg["mse"]))
            message = f"RTPI step {state.rtpi_step} loss {avg['loss']:.3f} (GD {avg['gd']:.3f}, MSE {avg['mse']:.3f})"
        else:
            optimiser.param_groups[1]["lr"] = cyclic_lr(state.fine_step, config.fine_lr)
            loss, values = fine_loss(nets, kit, config, generator)
            _clipped_step(optimiser, loss, nets.fine)
            state.fine_step += 1
            avg = smooth(values)
            if state.fine_step % _every(config.fine_steps) == 0:
                state.fine_history.append((state.fine_step, avg["eq7"], avg["l_n"]))
            message = f"fine step {state.fine_step} eq.7 loss {avg['eq7']:.3f} (L_N {avg['l_n']:.3f})"
        state.seconds = seconds_before + time.perf_counter() - started
        if (state.rtpi_step + state.fine_step) % config.checkpoint_every == 0:
            save_checkpoint(checkpoint, nets, optimiser, generator, state, config)
        progress((state.rtpi_step + state.fine_step) / total, message)
    save_checkpoint(checkpoint, nets, optimiser, generator, state, config)
    validation = validate(nets, kit, config, fine=state.fine_step > 0)
    summary = {"finished": state.stage == "done", "rtpi_steps": state.rtpi_step, "fine_steps": state.fine_step,
               "seconds": round(state.seconds, 1), "rtpi_seconds": round(state.rtpi_seconds or state.seconds, 1),
               "config": asdict(config), "ct": ct_fingerprint(ct), "mask": mask_source,
               "rtpi_history": state.rtpi_history, "fine_history": state.fine_history,
               "final_rtpi": _last(state.rtpi_history, ("loss", "gd", "mse")),
               "final_fine": _last(state.fine_history, ("eq7", "l_n")),
               "validation": validation, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    spec = {"format": 1, "ct": ct_fingerprint(ct), "geometry": model_geometry.as_dict(), "ct_mm": config.ct_mm,
            "mask_size": config.detector // 4, "sigma": list(config.sigma), "training": summary}
    save_model_dir(out, nets.rtpi, nets.fine, kit.mask, spec, model_card(summary))
    with atomic_output(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary



def _clipped_step(optimiser: torch.optim.Optimizer, loss: torch.Tensor, module: torch.nn.Module) -> None:
    """One optimiser step with the gradient norm of ``module`` clipped at 5: the eq. 7 loss goes
    through a double backward, whose rare large gradients would otherwise undo a stage's progress."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 5.0)
    optimiser.step()

def _every(steps: int) -> int:
    """History interval: every 10 steps, or more often for short runs (at least ten records)."""
    return max(1, min(10, steps // 10))


def _last(history: list, keys: tuple) -> dict | None:
    return dict(zip(("step",) + keys, history[-1])) if history else None


def model_card(summary: dict) -> str:
    c, v = summary["config"], summary["validation"]
    ct = summary["ct"]

    def errors(name):
        e = v.get(name)
        return ("n/a" if e is None else f"mean {e['rotation_error_deg']:.2f}° / {e['translation_error_mm']:.2f} mm, "
                f"median {e['median_rotation_error_deg']:.2f}° / {e['median_translation_error_mm']:.2f} mm, "
                f"failures (> 3° or > 3 mm) {100 * e['failure_rate']:.0f}%")

    fr, ff = summary["final_rtpi"], summary["final_fine"]
    budget = f"{c['max_minutes']} min" if c["max_minutes"] else "none"
    return "\n".join([
        "# Per-patient SOPI networks (RTPI + fine registration)",
        "",
        "Trained by `deepmmreg train sopi` (`DeepMultimodalRegLib/training/sopi_train.py`) from this one CT only;",
        "no weights from elsewhere. Use only with this CT and this C-arm geometry (checked when loading).",
        "",
        "## Data",
        f"- CT '{ct['name']}': grid {ct['shape']} (z, y, x), spacing {ct['spacing']} mm; DRRs from it averaged to"
        f" {c['ct_mm']} mm on a {c['detector']}² detector (the geometry's physical detector, resampled).",
        f"- Structure mask M for L_N: {summary['mask'] or 'bone (HU > 200)'}.",
        f"- Poses: the paper's distribution about the nominal AP view, σ = {list(c['sigma'])} (degrees ×3, mm ×3),",
        "  re-drawn unless the CT lies between source and detector and covers ≥ half the detector.",
        "- Targets: the projector's DRRs with random physics (bone 1–2× attenuation, scale 0.75–1.15,",
        "  Poisson noise at 5·10³–10⁵ photons, blur σ ≤ 1 px, gamma 0.5–1.3).",
        "",
        "## Recipe",
        f"- RTPI: batch {c['rtpi_batch']}, loss α·(1 − GD) + β·MSE + λ·L2 with α, β, λ = {c['alpha']},"
        f" {c['beta']},"
        f" {c['lam']}; GD on {c['similarity_size']}² DRRs of the CT at {c['similarity_ct_mm']} mm.",
        f"- Fine stage: batch {c['fine_batch']}, offsets N(0, {list(c['fine_offset_sigma'])}) × U(0.1, 1); eq. 7 loss"
        " (double backward through the encoders, DRR Jacobian by forward differences).",
        f"- Adam, cyclic learning rate (peak {c['rtpi_lr']} / {c['fine_lr']}, period 100); seed {c['seed']}.",
        "",
        "## Run",
        f"- {summary['rtpi_steps']} RTPI steps + {summary['fine_steps']} fine steps in"
        f" {summary['seconds'] / 60:.1f} min (RTPI {summary['rtpi_seconds'] / 60:.1f} min),"
        f" wall-time budget of the last invocation {budget},"
        f" {summary['threads']} CPU thread(s), torch {summary['torch']}, {summary['date']};"
        f" {'all steps done' if summary['finished'] else 'stopped by the budget'}.",
        f"- Final RTPI loss (running average): {fr['loss']:.4f} (GD similarity {fr['gd']:.3f}, MSE {fr['mse']:.3f})"
        if fr else "- RTPI: no steps.",
        f"- Final eq. 7 loss (running average, 0 best, 4 worst): {ff['eq7']:.3f} (L_N {ff['l_n']:.3f})"
        if ff else "- Fine stage: no steps.",
        "",
        "## Validation",
        f"{v['cases']} held-out poses, X-rays from the benchmark's simulator on the {c['detector']}² detector:",
        f"- RTPI alone: {errors('rtpi')}",
        f"- RTPI + fine stage ({c['fine_iterations']} iterations): {errors('fine')}",
        "",
    ])
