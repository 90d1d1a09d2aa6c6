"""``deepmmreg train disa``: train the DISA descriptor network from unregistered scans.

Recipe (paper section 3, sized for 2 CPU cores): scans resampled to 2 mm and z-scored; each step
draws a pair of scans (CT–MR, MR–MR, CT–CT; co-registered pairs sometimes at the same place), one
crop of each, and K patch pairs by the paper's t-sampling (:mod:`.disa_sampler`); both crops go
through the network once, with a shared random cube symmetry and independent intensity changes;
the loss is the squared difference between descriptor dot products and LC² targets of each
anchor against every site of the other crop, weighted so that every target bin of [0, 1] counts
the same over all anchors pooled (``loss_weighting="bins"``; the alternative ``"t-sampling"``
weighs each pair by the chance that the paper's sampler picks it for its anchor, and measured
worse on the held-out benchmark, docs/benchmarks.md). AdamW
with linear warm-up and cosine decay. Checkpoints are written atomically and a run resumes from
its last checkpoint. Validation uses crop pairs of held-out scans only, fixed by the seed.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..device import resolve_device
from ..errors import InvalidParameterError
from ..fileio import atomic_output
from .checkpoint import TrainingState, load_checkpoint, save_checkpoint, time_to_stop
from ..networks.disa_net import DISANet, count_parameters, sign_symmetric_mean
from ..progress import CancelToken, ProgressCallback, no_progress
from ..transforms.linear import euler_zxy_matrix
from .disa_sampler import (CROP, STRIDE, Augmentation, CropPair, DenseCropPair, crop, equalised_weights,
                           random_crop_origin, sample_crop_pair, sample_dense_crop_pair, sample_synthetic_crop_pair,
                           site_indices, t_sampling_weights)
from .disa_teacher import (LandmarkTeacher, build_teacher, distillation_loss, rotated_crop_with_targets,
                           teacher_targets_for_crop)
from .scans import SCANS, load_prepared_labels, load_prepared_scans, spec_by_name


@dataclass
class DisaTrainingConfig:
    steps: int = 3000
    anchors_per_crop: int = 512  # each against all 1331 sites of the other crop (dense loss)
    crop_pairs_per_step: int = 1
    learning_rate: float = 3e-4  # 2e-3 saturated every descriptor at norm 1 within a few steps
    gradient_clip: float = 1.0  # single crop pairs give noisy, occasionally large gradients
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    aligned_probability: float = 0.3  # co-registered scans: crops at the same place
    #: co-registered crops "at the same place" are shifted by up to this many voxels per axis, so
    #: corresponding points also fall between the stride-4 descriptor sites, where registration
    #: interpolates them (0: exactly the same place)
    aligned_jitter: int = 0
    #: how the dense loss weighs each anchor–site pair: "bins" = every target bin of [0, 1] gets the
    #: same weight over all anchors pooled (default); "t-sampling" = the probability that the
    #: paper's sampler picks it for its anchor among the crop's 1331 sites.  A 40-min A/B fine-tune
    #: (docs/benchmarks.md) found "t-sampling" calibrated to crop-sized candidate sets: lower MSE
    #: on crop validation, higher on full-volume held-out pairs, whose anchors have more candidates
    loss_weighting: str = "bins"
    #: train the descriptors registration uses, ½(φ(x) + φ(−x)) (two passes per crop), instead of
    #: the raw output; the loss and validation both see them
    sign_symmetric: bool = False
    #: start from these weights (a state_dict file) instead of a random initialisation: fine-tuning
    init_weights: str | None = None
    #: a fresh network's last (1×1) layer is multiplied by this: PyTorch's default initialisation
    #: gives descriptors of norm ~0.1, where every dot product and its gradient are tiny (a saddle
    #: of the bilinear loss); ~8 starts them near norm 1.  Ignored with init_weights
    output_init_scale: float = 1.0
    #: share of steps whose crop pair is two label-driven synthetic contrasts of one labelled
    #: training scan (MNI152, voxelmorph T1, LIDC CT) at the same place (shifted by up to
    #: ``aligned_jitter``), instead of a pair of real scans; 0 = real scans only (the first shipped run)
    synthetic_probability: float = 0.0
    #: the first ``distil_steps`` steps regress the descriptors of single crops onto a teacher
    #: embedding (:mod:`.disa_teacher`: landmark LC² features mapped to 16 dimensions) instead of the
    #: pairwise loss; 0 = the paper's pairwise loss throughout
    distil_steps: int = 0
    #: landmark patches of that teacher
    teacher_landmarks: int = 384
    #: half of the distillation crops are turned by U(±this) degrees about each axis, their targets
    #: following the anatomy (:func:`.disa_teacher.rotated_crop_with_targets`); 0 = upright crops only
    #: (the shipped run; 45 did not help in a 600-step check, docs/benchmarks.md)
    distil_rotation_deg: float = 0.0
    validation_crop_pairs: int = 16
    validation_every: int = 250
    checkpoint_every: int = 100
    max_minutes: float | None = None  # stop (and save) after this wall time; resume continues
    #: auto | cpu | cuda: the scans, the LC² targets and the network all live there (a GPU run needs
    #: no CPU round trip per step); the sampling generator stays on the CPU, so a seed draws the same
    #: crops and anchors on any device
    device: str = "auto"
    spacing_mm: float = 2.0
    seed: int = 0
    threads: int | None = None


def pair_pool(names: list[str]) -> list[tuple[str, str, bool]]:
    """All ordered pairs of distinct scans, and whether they are co-registered."""
    out = []
    for a in names:
        for b in names:
            if a != b:
                ga, gb = spec_by_name(a).group, spec_by_name(b).group
                out.append((a, b, bool(ga) and ga == gb))
    return out


def _choose_scans(scans: dict, pairs, config: DisaTrainingConfig, generator: torch.Generator):
    """(fitted volume, regressor volume, aligned) for one crop pair."""
    fitted, regressor, coregistered = pairs[int(torch.randint(len(pairs), (1,), generator=generator))]
    aligned = coregistered and bool(torch.rand(1, generator=generator) < config.aligned_probability)
    return scans[fitted].data, scans[regressor].data, aligned


def draw_crop_pair(scans: dict, pairs, config: DisaTrainingConfig, generator: torch.Generator) -> CropPair:
    fitted, regressor, aligned = _choose_scans(scans, pairs, config, generator)
    return sample_crop_pair(fitted, regressor, config.anchors_per_crop, generator, aligned)


def draw_dense_crop_pair(scans: dict, pairs, config: DisaTrainingConfig,
                         generator: torch.Generator) -> DenseCropPair:
    fitted, regressor, aligned = _choose_scans(scans, pairs, config, generator)
    return sample_dense_crop_pair(fitted, regressor, config.anchors_per_crop, generator, aligned,
                                  config.aligned_jitter)


def draw_training_pair(scans: dict, labels: dict, pairs, config: DisaTrainingConfig,
                       generator: torch.Generator) -> DenseCropPair:
    """One step's crop pair: real scans, or with ``synthetic_probability`` a synthetic co-registered
    pair of a labelled scan.  (No extra random draw when that probability is 0, so runs of the
    earlier recipe draw the same pairs as before.)"""
    if labels and config.synthetic_probability > 0 and \
            bool(torch.rand(1, generator=generator) < config.synthetic_probability):
        names = sorted(labels)
        name = names[int(torch.randint(len(names), (1,), generator=generator))]
        return sample_synthetic_crop_pair(scans[name].data, labels[name].data, config.anchors_per_crop, generator,
                                          config.aligned_jitter)
    return draw_dense_crop_pair(scans, pairs, config, generator)


def crop_descriptors(model: DISANet, pair: CropPair | DenseCropPair,
                     augmentation: Augmentation | None, sign_symmetric: bool = False) -> torch.Tensor:
    """Descriptors [2, 16, 17, 17, 17] of the fitted and regressor crops, in the crops' own axes
    (the augmentation is applied to the inputs and undone on the descriptor maps); with
    ``sign_symmetric`` the mean over each crop and its negative, as registration computes them."""
    crops = [pair.fitted, pair.regressor]
    if augmentation is not None:
        crops = [augmentation.image(c, i) for i, c in enumerate(crops)]
    batch = torch.stack(crops)[:, None]
    descriptors = sign_symmetric_mean(model, batch) if sign_symmetric else model(batch)
    if augmentation is not None:
        descriptors = augmentation.undo_on_descriptors(descriptors)
    return descriptors


#: the dense loss weightings, by DisaTrainingConfig.loss_weighting
LOSS_WEIGHTINGS = {"t-sampling": t_sampling_weights, "bins": equalised_weights}


def dense_loss(model: DISANet, pair: DenseCropPair, augmentation: Augmentation | None,
               weighting: str = "bins", sign_symmetric: bool = False) -> torch.Tensor:
    """Weighted squared error of the dot products of K anchors with every site (see LOSS_WEIGHTINGS)."""
    descriptors = crop_descriptors(model, pair, augmentation, sign_symmetric)
    anchors = pair.anchors.to(descriptors.device)
    a = descriptors[0][:, anchors[:, 0], anchors[:, 1], anchors[:, 2]]  # [C, K]
    first = int(site_indices()[0]) // STRIDE
    s = pair.targets.shape[-1]
    b = descriptors[1][:, first:first + s, first:first + s, first:first + s].reshape(a.shape[0], -1)  # [C, S³]
    predicted = a.T @ b
    targets = pair.targets.reshape(predicted.shape)
    return (LOSS_WEIGHTINGS[weighting](targets) * (predicted - targets) ** 2).sum()


def predicted_similarity(model: DISANet, pair: CropPair, augmentation: Augmentation | None,
                         sign_symmetric: bool = False) -> torch.Tensor:
    """Dot products of the descriptors at the anchor and partner sites, [K]."""
    descriptors = crop_descriptors(model, pair, augmentation, sign_symmetric)
    anchors, partners = pair.anchors.to(descriptors.device), pair.partners.to(descriptors.device)
    a = descriptors[0][:, anchors[:, 0], anchors[:, 1], anchors[:, 2]]
    b = descriptors[1][:, partners[:, 0], partners[:, 1], partners[:, 2]]
    return (a * b).sum(0)


def evaluate(model: DISANet, pairs: list[CropPair], sign_symmetric: bool = False) -> dict:
    """MSE and Pearson correlation between dot products and targets over fixed crop pairs."""
    model.eval()
    with torch.no_grad():
        pred = torch.cat([predicted_similarity(model, p, None, sign_symmetric) for p in pairs]).double()
    model.train()
    target = torch.cat([p.targets for p in pairs]).double().to(pred.device)
    mse = float(((pred - target) ** 2).mean())
    pearson = float(torch.corrcoef(torch.stack([pred, target]))[0, 1])
    return {"mse": mse, "pearson": pearson, "pairs": int(target.numel()),
            "target_mean": float(target.mean()), "target_std": float(target.std())}


def scale_output_layer(model: DISANet, factor: float) -> None:
    """Multiply the last (1×1, bias-free) layer's weights by ``factor``: the descriptors scale with it."""
    if factor <= 0:
        raise InvalidParameterError(f"output_init_scale must be > 0, got {factor}")
    with torch.no_grad():
        model.layers[-1].weight.mul_(factor)


def scans_on(scans: dict, device: torch.device) -> dict:
    """The prepared scans with their voxels on ``device``."""
    return {name: scan.to(device) for name, scan in scans.items()}


def validation_set(config: DisaTrainingConfig, data_dir, cache_dir, device: torch.device | None = None) -> list[CropPair]:
    scans = load_prepared_scans(data_dir, "validation", config.spacing_mm, cache_dir)
    if device is not None:
        scans = scans_on(scans, device)
    generator = torch.Generator().manual_seed(10_000 + config.seed)
    pairs = pair_pool(sorted(scans))
    return [draw_crop_pair(scans, pairs, config, generator) for _ in range(config.validation_crop_pairs)]


def learning_rate(step: int, config: DisaTrainingConfig) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


#: descriptor sites of a crop that the distillation loss uses: ≥ 8 voxels from the faces, so every
#: teacher patch (radius ≤ 7) lies inside the crop the network sees
DISTIL_FIRST_SITE = 2


def prepare_teacher(out: Path, scans: dict, config: DisaTrainingConfig, device: torch.device) -> dict:
    """The teacher's descriptor map of every training scan, {name: [16, d, h, w]} on ``device``.  The
    teacher (``teacher.pt``) and the maps (``teacher_maps/NAME.pt``) are kept in the run folder, so a
    resumed run uses the same ones.  The teacher is drawn from a generator of its own (seeded with the
    run's seed), so the run's generator, and with it every crop the run draws, is untouched."""
    path = out / "teacher.pt"
    if path.is_file():
        teacher = LandmarkTeacher.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        teacher, report = build_teacher([scans[name].data.cpu() for name in sorted(scans)],
                                        torch.Generator().manual_seed(config.seed),
                                        landmarks=config.teacher_landmarks)
        with atomic_output(path) as tmp:
            torch.save(teacher.state_dict(), tmp)
        with atomic_output(out / "teacher.json") as tmp:
            tmp.write_text(json.dumps(report, indent=2))
    maps = {}
    for name in sorted(scans):
        cached = out / "teacher_maps" / f"{name}.pt"
        if not cached.is_file():
            cached.parent.mkdir(exist_ok=True)
            with atomic_output(cached) as tmp:
                torch.save(teacher.embed_volume(scans[name].data.cpu()), tmp)
        maps[name] = torch.load(cached, map_location="cpu", weights_only=True).to(device)
    return maps


def distillation_batch_loss(model: DISANet, scans: dict, maps: dict, config: DisaTrainingConfig,
                            generator: torch.Generator) -> torch.Tensor:
    """One distillation step's loss: ``2 × crop_pairs_per_step`` crops of random training scans (corners
    on the descriptor grid, a random sign and affine intensity change each, which leave LC² and so the
    teacher unchanged; half of them turned by up to ``distil_rotation_deg`` about each axis, their
    targets following the anatomy), each descriptor regressed onto the teacher's at the crop's inner
    sites."""
    names = sorted(scans)
    crops, targets = [], []
    for _ in range(2 * config.crop_pairs_per_step):
        name = names[int(torch.randint(len(names), (1,), generator=generator))]
        data = scans[name].data
        corner = [c - c % STRIDE for c in random_crop_origin(data.shape, generator, data)]
        scale, shift = Augmentation.random(generator).intensity[0]
        if config.distil_rotation_deg > 0 and bool(torch.rand(1, generator=generator) < 0.5):
            angles = (2 * torch.rand(1, 3, generator=generator, dtype=torch.float64) - 1) * math.radians(config.distil_rotation_deg)
            image, target = rotated_crop_with_targets(data, maps[name], corner, CROP, euler_zxy_matrix(angles)[0])
        else:
            image, target = crop(data, corner), teacher_targets_for_crop(maps[name], corner, CROP)
        crops.append(scale * image + shift)
        targets.append(target)
    batch = torch.stack(crops)[:, None].float()
    descriptors = sign_symmetric_mean(model, batch) if config.sign_symmetric else model(batch)
    inner = slice(DISTIL_FIRST_SITE, descriptors.shape[-1] - DISTIL_FIRST_SITE)
    return distillation_loss(descriptors[:, :, inner, inner, inner], torch.stack(targets)[:, :, inner, inner, inner])


def train_disa(out_dir: str | Path, config: DisaTrainingConfig | None = None, data_dir=None,
               progress: ProgressCallback | None = None, cancel: CancelToken | None = None) -> dict:
    """Train (or resume) in ``out_dir``; returns the summary written to ``out_dir/summary.json``."""
    config = config or DisaTrainingConfig()
    if config.loss_weighting not in LOSS_WEIGHTINGS:
        raise InvalidParameterError(f"unknown DISA loss weighting {config.loss_weighting!r}; "
                                    f"choose one of {', '.join(LOSS_WEIGHTINGS)}")
    if not 0.0 <= config.synthetic_probability <= 1.0:
        raise InvalidParameterError(f"synthetic_probability must be in [0, 1], got {config.synthetic_probability}")
    progress = progress or no_progress
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    cache = out / "prepared_scans"
    train_scans = scans_on(load_prepared_scans(data_dir, "train", config.spacing_mm, cache), device)
    train_labels = (scans_on(load_prepared_labels(train_scans, data_dir, cache), device)
                    if config.synthetic_probability > 0 else {})
    if config.synthetic_probability > 0 and not train_labels:
        raise InvalidParameterError("synthetic_probability > 0 needs labelled training scans; none has a label map")
    validation = validation_set(config, data_dir, cache, device)
    pairs = pair_pool(sorted(train_scans))
    teacher_maps = prepare_teacher(out, train_scans, config, device) if config.distil_steps > 0 else {}

    model = DISANet()
    if config.init_weights:
        model.load_state_dict(torch.load(config.init_weights, map_location="cpu", weights_only=True))
    else:
        scale_output_layer(model, config.output_init_scale)
    model.to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    checkpoint = out / "checkpoint.pt"
    state = load_checkpoint(checkpoint, model, optimiser, generator, TrainingState(), map_location=device)

    def checkpoint_now():
        save_checkpoint(checkpoint, model, optimiser, generator, state, config)

    started = time.perf_counter()
    seconds_before = state.seconds
    running = None
    model.train()
    while state.step < config.steps:
        if time_to_stop(cancel, started, config.max_minutes):
            break
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(state.step, config)
        optimiser.zero_grad(set_to_none=True)
        losses = []
        if state.step < config.distil_steps:
            loss = distillation_batch_loss(model, train_scans, teacher_maps, config, generator)
            loss.backward()
            losses.append(float(loss.detach()))
        for _ in range(0 if state.step < config.distil_steps else config.crop_pairs_per_step):
            pair = draw_training_pair(train_scans, train_labels, pairs, config, generator)
            loss = dense_loss(model, pair, Augmentation.random(generator), config.loss_weighting,
                              config.sign_symmetric)
            (loss / config.crop_pairs_per_step).backward()
            losses.append(float(loss.detach()))
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.gradient_clip)
        optimiser.step()
        state.step += 1
        value = sum(losses) / len(losses)
        # the distillation and pairwise losses measure different things: the running mean restarts at the switch
        fresh = running is None or state.step == config.distil_steps + 1  # the first pairwise step
        running = value if fresh else 0.98 * running + 0.02 * value
        state.seconds = seconds_before + time.perf_counter() - started
        if state.step % 10 == 0:
            state.history.append((state.step, running))
        if state.step % config.validation_every == 0 or state.step == config.steps:
            state.validation.append({"step": state.step, "seconds": round(state.seconds, 1),
                                     "train_mse_running": running,
                                     **evaluate(model, validation, config.sign_symmetric)})
        if state.step % config.checkpoint_every == 0 or state.step == config.steps:
            checkpoint_now()
        progress(state.step / config.steps, f"step {state.step} mse {running:.4f}")
    checkpoint_now()
    if not state.validation or state.validation[-1]["step"] != state.step:
        state.validation.append({"step": state.step, "seconds": round(state.seconds, 1),
                                 "train_mse_running": running,
                                 **evaluate(model, validation, config.sign_symmetric)})
    weights = out / "disa.pt"
    with atomic_output(weights) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    summary = {"steps": state.step, "finished": state.step >= config.steps, "seconds": round(state.seconds, 1),
               "parameters": count_parameters(model), "config": asdict(config),
               "train_scans": sorted(train_scans), "validation_scans": [s.name for s in SCANS if s.split == "validation"],
               "final_validation": state.validation[-1], "validation": state.validation,
               "train_mse_running": running, "threads": torch.get_num_threads(), "device": str(device)}
    if (out / "teacher.json").is_file():
        summary["teacher"] = json.loads((out / "teacher.json").read_text())
    with atomic_output(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary
