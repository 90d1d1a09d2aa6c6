"""``deepmmreg train translation``: the disentangled translation model behind MS-ODE's learned similarity.

Losses (paper section 2.2, after the diverse image-to-image translation framework it extends), for
two images x_a, x_b of contrast groups a ≠ b with c = E^c(x), s = E^s(x, group):

* self-reconstruction L^x_rec = |G(c_a, s_a, a) − x_a| + |G(c_b, s_b, b) − x_b|;
* translation x_ab = G(c_a, s_b, b), x_ba = G(c_b, s_a, a), judged by the discriminator (LSGAN:
  the generator wants D(x_ab, b) = 1, the discriminator wants D(x_b, b) = 1 and D(x_ab, b) = 0);
* content and style reconstruction L^c_rec = |E^c(x_ab) − c_a| + |E^c(x_ba) − c_b|,
  L^s_rec = |E^s(x_ba, a) − s_a| + |E^s(x_ab, b) − s_b|;
* cycle consistency L_cyc = |G(ĉ_a, ŝ_a, a) − x_a| + |G(ĉ_b, ŝ_b, b) − x_b| with ĉ, ŝ the codes
  re-encoded from the translations;
* optional, not in the paper: ``lambda_pair``·|c_a − c_b| — the training pairs are co-registered
  by construction, and saying so directly makes the content code contrast-blind within a CPU-sized
  run, where the adversarial game alone has too few steps to do it (0 turns it off).

One Adam optimiser holds both halves (one checkpoint through :mod:`.checkpoint`); each half-step
clears the other half's gradients before stepping, so the discriminator never moves on the
generator's loss.  A run resumes in its folder and stops after ``max_minutes`` (checkpointed).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..fileio import atomic_output
from ..msode.translation import TranslationConfig, TranslationGAN
from ..progress import CancelToken, ProgressCallback, no_progress
from .checkpoint import TrainingState, load_checkpoint, save_checkpoint, time_to_stop, write_run_records
from .msode_data import load_prepared_anatomies
from .translation_data import SlicePairs, SliceSampling, sample_pairs

#: generator-side loss terms, in the order they are reported
TERMS = ("gan", "x", "cyc", "content", "style", "pair")


@dataclass
class TranslationTrainingConfig:
    steps: int = 2400
    batch: int = 8
    learning_rate: float = 3e-4
    #: volumes are resampled to ``grid``³ voxels of ``spacing_mm`` (3 mm × 88 holds any head)
    grid: int = 88
    spacing_mm: float = 3.0
    crop: int = 64
    slices: int = 5
    rotation_deg: float = 90.0
    width: int = 16
    content_channels: int = 32
    style_dim: int = 8
    lambda_gan: float = 1.0
    lambda_x: float = 10.0
    lambda_cyc: float = 10.0
    lambda_content: float = 1.0
    lambda_style: float = 1.0
    lambda_pair: float = 1.0
    validation_every: int = 100
    validation_batches: int = 2
    checkpoint_every: int = 50
    max_minutes: float | None = None
    seed: int = 0
    threads: int | None = None

    def model_config(self) -> TranslationConfig:
        return TranslationConfig(slices=self.slices, content_channels=self.content_channels, style_dim=self.style_dim,
                                 width=self.width, spacing_mm=self.spacing_mm)

    def sampling(self) -> SliceSampling:
        return SliceSampling(crop=self.crop, slices=self.slices, rotation_deg=self.rotation_deg)

    def weights(self) -> dict[str, float]:
        return {"gan": self.lambda_gan, "x": self.lambda_x, "cyc": self.lambda_cyc, "content": self.lambda_content,
                "style": self.lambda_style, "pair": self.lambda_pair}


def _l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean()


def generator_terms(gan: TranslationGAN, pairs: SlicePairs, weights: dict[str, float]):
    """The generator-side terms (and their weighted total) and the two translations."""
    t, d = gan.translator, gan.discriminator
    a, b, ia, ib = pairs.a, pairs.b, pairs.code_a, pairs.code_b
    c_a, c_b = t.content(a), t.content(b)
    s_a, s_b = t.style(a, ia), t.style(b, ib)
    x_ab, x_ba = t.generator(c_a, s_b, ib), t.generator(c_b, s_a, ia)
    c_a_hat, c_b_hat = t.content(x_ab), t.content(x_ba)
    s_a_hat, s_b_hat = t.style(x_ba, ia), t.style(x_ab, ib)
    terms = {
        "gan": ((d(x_ab, ib) - 1) ** 2).mean() + ((d(x_ba, ia) - 1) ** 2).mean(),
        "x": _l1(t.generator(c_a, s_a, ia), a) + _l1(t.generator(c_b, s_b, ib), b),
        "cyc": _l1(t.generator(c_a_hat, s_a_hat, ia), a) + _l1(t.generator(c_b_hat, s_b_hat, ib), b),
        "content": _l1(c_a_hat, c_a) + _l1(c_b_hat, c_b),
        "style": _l1(s_a_hat, s_a) + _l1(s_b_hat, s_b),
        "pair": _l1(c_a, c_b),
    }
    terms["total"] = sum(weights[k] * terms[k] for k in TERMS)
    return terms, (x_ab, x_ba)


def discriminator_loss(gan: TranslationGAN, pairs: SlicePairs, fakes) -> torch.Tensor:
    d = gan.discriminator
    x_ab, x_ba = (f.detach() for f in fakes)
    real = ((d(pairs.b, pairs.code_b) - 1) ** 2).mean() + ((d(pairs.a, pairs.code_a) - 1) ** 2).mean()
    fake = (d(x_ab, pairs.code_b) ** 2).mean() + (d(x_ba, pairs.code_a) ** 2).mean()
    return real + fake


def _clear_grads(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def train_step(gan: TranslationGAN, optimiser: torch.optim.Optimizer, pairs: SlicePairs, weights: dict[str, float],
               update_generator: bool = True, update_discriminator: bool = True) -> dict[str, float]:
    """One generator half-step then one discriminator half-step; returns the terms (floats)."""
    optimiser.zero_grad(set_to_none=True)
    terms, fakes = generator_terms(gan, pairs, weights)
    if update_generator:
        terms["total"].backward()
        _clear_grads(gan.discriminator)
        optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    d_loss = discriminator_loss(gan, pairs, fakes)
    if update_discriminator:
        d_loss.backward()
        _clear_grads(gan.translator)
        optimiser.step()
    out = {k: float(v.detach()) for k, v in terms.items()}
    out["disc"] = float(d_loss.detach())
    return out


def content_ratio(gan: TranslationGAN, pairs: SlicePairs) -> float:
    """Mean content distance of co-registered contrast pairs over that of mismatched slices (the
    batch's b rolled by one): below 1 means the content code follows anatomy more than contrast."""
    c_a, c_b = gan.translator.content(pairs.a), gan.translator.content(pairs.b)
    same = (c_a - c_b).pow(2).mean(dim=(1, 2, 3)).sqrt().mean()
    other = (c_a - c_b.roll(1, 0)).pow(2).mean(dim=(1, 2, 3)).sqrt().mean()
    return float(same / other.clamp_min(1e-12))


def evaluate(gan: TranslationGAN, batches: list[SlicePairs], weights: dict[str, float]) -> dict[str, float]:
    gan.eval()
    sums: dict[str, float] = {}
    with torch.no_grad():
        for pairs in batches:
            terms, fakes = generator_terms(gan, pairs, weights)
            values = {**{k: float(v) for k, v in terms.items()}, "disc": float(discriminator_loss(gan, pairs, fakes)),
                      "content_ratio": content_ratio(gan, pairs)}
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v / len(batches)
    gan.train()
    return sums


def train_translation(out_dir: str | Path, config: TranslationTrainingConfig | None = None, data_dir=None,
                      progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
                      anatomies=None) -> dict:
    """Train (or resume) in ``out_dir``; returns the summary also written to ``out_dir/summary.json``."""
    config = config or TranslationTrainingConfig()
    progress = progress or no_progress
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    if anatomies is None:
        anatomies = load_prepared_anatomies(data_dir, config.grid, config.spacing_mm, out / "prepared_anatomies")
    sampling, weights = config.sampling(), config.weights()
    torch.manual_seed(config.seed)
    gan = TranslationGAN(config.model_config())
    groups = gan.config.groups
    validation_generator = torch.Generator().manual_seed(100_000 + config.seed)
    validation = [sample_pairs(anatomies, config.batch, groups, sampling, validation_generator)
                  for _ in range(config.validation_batches)]
    # Adam β1 = 0.5: the usual setting for adversarial training (a slower first moment oscillates less)
    optimiser = torch.optim.Adam(gan.parameters(), lr=config.learning_rate, betas=(0.5, 0.999))
    generator = torch.Generator().manual_seed(config.seed)
    checkpoint = out / "checkpoint.pt"
    state = load_checkpoint(checkpoint, gan, optimiser, generator, TrainingState())

    def checkpoint_now():
        save_checkpoint(checkpoint, gan, optimiser, generator, state, config)

    def validate():
        state.validation.append({"step": state.step, "seconds": round(state.seconds, 1),
                                 **evaluate(gan, validation, weights)})

    if not state.validation:
        validate()
    started = time.perf_counter()
    seconds_before = state.seconds
    running: dict[str, float] = {}
    gan.train()
    while state.step < config.steps:
        if time_to_stop(cancel, started, config.max_minutes):
            break
        pairs = sample_pairs(anatomies, config.batch, groups, sampling, generator)
        terms = train_step(gan, optimiser, pairs, weights)
        state.step += 1
        for k, v in terms.items():
            running[k] = v if k not in running else 0.95 * running[k] + 0.05 * v
        state.seconds = seconds_before + time.perf_counter() - started
        state.history.append({"step": state.step, **{k: round(v, 5) for k, v in terms.items()}})
        if state.step % config.validation_every == 0 or state.step == config.steps:
            validate()
        if state.step % config.checkpoint_every == 0 or state.step == config.steps:
            checkpoint_now()
        progress(state.step / config.steps, f"step {state.step} x {running['x']:.3f} cyc {running['cyc']:.3f} "
                                            f"pair {running['pair']:.3f} gan {running['gan']:.3f} d {running['disc']:.3f}")
    checkpoint_now()
    if state.validation[-1]["step"] != state.step:
        validate()
        checkpoint_now()
    weights_file = out / "msode_translation.pt"
    with atomic_output(weights_file) as tmp:
        torch.save(gan.translator.state_dict_with_config(), tmp)
    summary = {"steps": state.step, "finished": state.step >= config.steps, "seconds": round(state.seconds, 1),
               "config": asdict(config), "parameters": int(sum(p.numel() for p in gan.translator.parameters())),
               "content_encoder_parameters": int(sum(p.numel() for p in gan.translator.content.parameters())),
               "anatomies": [a.name for a in anatomies], "contrasts": list(gan.config.contrasts),
               "initial_validation": state.validation[0], "final_validation": state.validation[-1],
               "validation": state.validation, "running": running, "threads": torch.get_num_threads(),
               "weights": str(weights_file)}
    write_run_records(out, summary, state.history)
    return summary
