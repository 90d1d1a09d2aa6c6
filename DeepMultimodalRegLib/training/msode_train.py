"""``deepmmreg train msode``: train an MS-ODE model without registered training pairs.

Loss (paper section 2.1): L = L_sim + λ_self·L_self + λ_reg·L_reg, with
* L_sim: MIND-SSC distance between the warped moving image and the fixed image of another contrast
  (:mod:`DeepMultimodalRegLib.msode.similarity`);
* L_self: the transform error ‖φ_θT(x) − φ_θ̃(x)‖² in mm², averaged over the fixed brain and divided
  by ``self_scale_mm``², against the random motion θ̃ that made the pair.  The paper applies it to
  same-contrast copies; here (``self_pairs="cross"``, the only option so far) the pair is the two
  contrasts of one anatomy, co-registered by construction, so one ODE solve serves both terms.  The error is measured on points rather than on
  θ so rotations and translations weigh by their effect in mm;
* L_reg: E‖∇u‖² of the displacement on the finest grid (deformable models; λ_reg = 2 B-spline,
  10 dense as the paper).
Adam with gradient clipping; checkpoints written atomically; a run resumes in its folder and stops
after ``max_minutes`` (checkpointed), so a time-boxed run can be continued.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..device import resolve_device
from ..errors import InvalidParameterError
from ..fileio import atomic_output
from .checkpoint import TrainingState, load_checkpoint, save_checkpoint, time_to_stop, write_run_records
from ..msode.model import MSODE, MSODEConfig
from ..msode.similarity import similarity_loss
from ..msode.solvers import parse_solvers
from ..msode.warp import apply_homogeneous, field_points, gradient_penalty, rigid_homogeneous
from ..progress import CancelToken, ProgressCallback, no_progress
from .msode_data import MotionSettings, TrainingBatch, load_prepared_anatomies, make_batch


@dataclass
class MSODETrainingConfig:
    kind: str = "rigid"
    steps: int = 2000
    batch: int = 2
    #: Adam's rate: the paper's 1e-4.  At 1e-3 (the earlier default) rigid training never learned: Adam
    #: moves every weight of the zero-started head by ~lr per step, which with the rates' scale
    #: (0.5 rad, 10 mm per unit time, T = 3) jolts θ(T) by ~2° and ~1 mm per component per step,
    #: in a direction set by the last few random motions.  Same 19-min run (32³ × 8 mm, ±25°):
    #: validation RMSE(φ) 24.3 → 23.9 mm (peaks 35.8) at 1e-3, 24.3 → 8.7 mm at 1e-4.
    learning_rate: float = 1e-4
    gradient_clip: float = 1.0
    #: working grid: 48³ voxels of 5 mm (brains of up to 240 mm) — sized for 2 CPU cores
    size: int = 48
    spacing_mm: float = 5.0
    levels: int = 3
    total_time: float = 3.0
    #: solvers used while training (fixed steps keep the cost predictable); the model keeps
    #: ``inference_solvers`` (default: the paper's) for registration
    training_solvers: str = "F(0.25)-F(0.5)-F(1.0)"
    inference_solvers: str = ""
    backprop: str = "direct"
    inputs: str = "image+mind"
    width: int = 16
    mesh: int = 8
    similarity: str = "mind"
    #: rigid, B-spline: f also sees the MIND-SSC descent direction (see MSODEConfig.gradient_input)
    gradient_input: bool = False
    descent_rate: float | None = None  # None: the kind's default (msode.model.DEFAULT_DESCENT_RATES)
    lambda_self: float = 1.0
    lambda_reg: float | None = None  # None: 2 (B-spline), 10 (dense), 0 (rigid)
    self_pairs: str = "cross"
    self_scale_mm: float = 10.0
    rotation_deg: float = 75.0
    translation_mm: float = 20.0
    bspline_sigma_mm: float = 8.0
    real_t1_probability: float = 0.25
    validation_every: int = 25
    validation_batches: int = 2
    checkpoint_every: int = 5
    max_minutes: float | None = None
    seed: int = 0
    threads: int | None = None
    #: auto | cpu | cuda; batches are drawn on the CPU (one generator, so a seed gives the same
    #: motions and contrasts on any device) and moved there
    device: str = "auto"

    def model_config(self) -> MSODEConfig:
        return MSODEConfig(kind=self.kind, levels=self.levels, total_time=self.total_time,
                           solvers=self.inference_solvers, size=self.size, spacing_mm=self.spacing_mm,
                           inputs=self.inputs, width=self.width, mesh=self.mesh, similarity=self.similarity,
                           gradient_input=self.gradient_input, descent_rate=self.descent_rate)

    @property
    def reg_weight(self) -> float:
        if self.lambda_reg is not None:
            return self.lambda_reg
        return {"rigid": 0.0, "bspline": 2.0, "dense": 10.0}[self.kind]

    def motion(self) -> MotionSettings:
        return MotionSettings(self.rotation_deg, self.translation_mm, self.bspline_sigma_mm, self.mesh)


def mapped_points(model: MSODE, fields, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """φ_θ at the finest fixed grid points [B, D, H, W, 3], and the displacement u (deformable)."""
    finest = fields[-1]
    if model.config.kind == "rigid":
        return apply_homogeneous(rigid_homogeneous(theta, finest.c_fixed, finest.c_moving), finest.points), None
    u = finest.displacement(theta)
    return apply_homogeneous(finest.pre, field_points(finest.points, u)), u


def loss_terms(model: MSODE, batch: TrainingBatch, config: MSODETrainingConfig, solvers) -> dict[str, torch.Tensor]:
    """L_sim, L_self, L_reg (and the transform RMSE in mm) of one batch; differentiable."""
    theta, info, fields = model.solve(batch.pairs, solvers=solvers, backprop=config.backprop)
    warped = fields[-1].warp(theta)
    l_sim = similarity_loss(warped, batch.pairs.fixed[-1], config.similarity,
                            spacing_mm=fields[-1].fixed_geometry.spacing[0])
    points, u = mapped_points(model, fields, theta)
    sq = ((points - batch.truth_points) ** 2).sum(-1)
    w = batch.weight
    mse = (sq * w).sum() / w.sum().clamp_min(1.0)
    l_self = mse / config.self_scale_mm ** 2
    l_reg = gradient_penalty(u, fields[-1].moving_geometry.spacing[0]) if u is not None else theta.new_zeros(())
    total = l_sim + config.lambda_self * l_self + config.reg_weight * l_reg
    return {"total": total, "sim": l_sim, "self": l_self, "reg": l_reg, "rmse_mm": mse.detach().sqrt(),
            "nfe": torch.tensor(float(info.total_nfe))}


def evaluate(model: MSODE, batches, config, solvers) -> dict:
    model.eval()
    sums: dict[str, float] = {}
    with torch.no_grad():
        for b in batches:
            for k, v in loss_terms(model, b, config, solvers).items():
                sums[k] = sums.get(k, 0.0) + float(v) / len(batches)
    model.train()
    return sums


def train_msode(out_dir: str | Path, config: MSODETrainingConfig | None = None, data_dir=None,
                progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
                anatomies=None) -> dict:
    """Train (or resume) in ``out_dir``; returns the summary also written to ``out_dir/summary.json``."""
    config = config or MSODETrainingConfig()
    if config.self_pairs != "cross":
        raise InvalidParameterError("self_pairs='same' (the paper's same-contrast L_self pairs) is not implemented "
                                    "yet; use 'cross'")
    progress = progress or no_progress
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    if anatomies is None:
        anatomies = load_prepared_anatomies(data_dir, config.size, config.spacing_mm, out / "prepared_anatomies")
    solvers = parse_solvers(config.training_solvers)
    motion = config.motion()
    validation_generator = torch.Generator().manual_seed(100_000 + config.seed)
    device = resolve_device(config.device)
    validation = [make_batch(anatomies, config.kind, config.batch, config.levels, motion, validation_generator,
                             config.real_t1_probability).to(device) for _ in range(config.validation_batches)]

    torch.manual_seed(config.seed)
    model = MSODE(config.model_config()).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    checkpoint = out / "checkpoint.pt"
    state = load_checkpoint(checkpoint, model, optimiser, generator, TrainingState(), map_location=device)
    for group in optimiser.param_groups:  # a resumed run takes the rate it is given (e.g. a lower one to settle)
        group["lr"] = config.learning_rate

    def checkpoint_now():
        save_checkpoint(checkpoint, model, optimiser, generator, state, config)

    if not state.validation:
        state.validation.append({"step": 0, "seconds": 0.0, **evaluate(model, validation, config, solvers)})
    started = time.perf_counter()
    seconds_before = state.seconds
    running: dict[str, float] = {}
    model.train()
    while state.step < config.steps:
        if time_to_stop(cancel, started, config.max_minutes):
            break
        batch = make_batch(anatomies, config.kind, config.batch, config.levels, motion, generator,
                           config.real_t1_probability).to(device)
        optimiser.zero_grad(set_to_none=True)
        terms = loss_terms(model, batch, config, solvers)
        loss = terms["total"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.gradient_clip)
        optimiser.step()
        state.step += 1
        for k, v in terms.items():
            v = float(v.detach())
            running[k] = v if k not in running else 0.9 * running[k] + 0.1 * v
        state.seconds = seconds_before + time.perf_counter() - started
        state.history.append({"step": state.step, **{k: round(float(v.detach()), 5) for k, v in terms.items()}})
        if state.step % config.validation_every == 0 or state.step == config.steps:
            state.validation.append({"step": state.step, "seconds": round(state.seconds, 1),
                                     **evaluate(model, validation, config, solvers)})
        if state.step % config.checkpoint_every == 0 or state.step == config.steps:
            checkpoint_now()
        progress(state.step / config.steps,
                 f"step {state.step} sim {running['sim']:.4f} self {running['self']:.3f} rmse {running['rmse_mm']:.1f} mm")
    checkpoint_now()
    if state.validation[-1]["step"] != state.step:
        state.validation.append({"step": state.step, "seconds": round(state.seconds, 1),
                                 **evaluate(model, validation, config, solvers)})
    weights = out / f"msode_{config.kind}.pt"
    with atomic_output(weights) as tmp:
        torch.save(model.state_dict_with_config(), tmp)
    summary = {"kind": config.kind, "steps": state.step, "finished": state.step >= config.steps,
               "seconds": round(state.seconds, 1), "config": asdict(config),
               "parameters": int(sum(p.numel() for p in model.parameters())),
               "anatomies": [a.name for a in anatomies], "initial_validation": state.validation[0],
               "final_validation": state.validation[-1], "validation": state.validation,
               "running": running, "threads": torch.get_num_threads(), "device": str(device), "weights": str(weights)}
    write_run_records(out, summary, state.history)
    return summary

