"""The general model's training recipe (issue 5): self-supervised pairs, artefacts, resumable runs, and
the shipped weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from DeepMultimodalRegLib.rso.train_general import (GeneralTrainingConfig, field_bank, make_pair, train_general,
                                                    true_correction)
from DeepMultimodalRegLib.rso.working_grid import to_working, warp_on_grid, working_geometry


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


@pytest.fixture(scope="module")
def pelvis_8mm(pelvis_ct):
    from DeepMultimodalRegLib.rso.prepare import normalise

    return to_working(normalise(pelvis_ct, "CT"), working_geometry(pelvis_ct.geometry, 8.0))


def test_training_pairs_are_aligned_by_the_known_correction(pelvis_8mm):
    """moving(x + d(x)) = fixed(x) for the d the recipe computes from its own random deformation."""
    config = GeneralTrainingConfig(spacing_mm=8.0, crop=32, rotation_rad=(0.0, 0.0, 0.0), zoom=(1.0, 1.0),
                                   artefact_probability=0.0, max_displacement_mm=(12.0, 12.0))
    bank = field_bank(config, 2, seed=1)
    fixed, moving, u = make_pair(pelvis_8mm, "CT", bank, config, torch.Generator().manual_seed(4))
    assert float(torch.linalg.norm(u, dim=1).max()) * 8.0 == pytest.approx(12.0, rel=0.2)
    d = true_correction(u)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    before = float(((moving - fixed)[inner] ** 2).mean())
    after = float(((warp_on_grid(moving, d) - fixed)[inner] ** 2).mean())
    assert before > 1e-4
    assert after < 0.1 * before


def test_cbct_artefacts_change_the_ct_but_keep_its_anatomy(pelvis_8mm):
    from DeepMultimodalRegLib.rso.artefacts import cbct_artefacts

    noisy = cbct_artefacts(pelvis_8mm, torch.Generator().manual_seed(0))
    difference = (noisy - pelvis_8mm).abs()
    assert noisy.shape == pelvis_8mm.shape and float(difference.mean()) > 0.003
    assert float(difference.mean()) < 0.1  # HU differences of tens, not hundreds
    corr = np.corrcoef(noisy.flatten().numpy(), pelvis_8mm.flatten().numpy())[0, 1]
    assert corr > 0.9


def test_training_runs_and_resumes_from_its_checkpoint(tmp_path, pelvis_8mm):
    """Two steps, then two more from the checkpoint; the weights load into a session."""
    from DeepMultimodalRegLib.training.scans import SCANS

    cache = tmp_path / "run" / "prepared"
    cache.mkdir(parents=True)
    for spec in SCANS:  # the recipe's cache, filled with the real pelvis CT (reading 8 scans is slow)
        torch.save(pelvis_8mm.clone(), cache / f"{spec.name}_8mm_general.pt")
    config = GeneralTrainingConfig(steps=2, spacing_mm=8.0, crop=32, field_bank=2, validation_pairs=2,
                                   validation_every=2, checkpoint_every=1, seed=0)
    first = train_general(tmp_path / "run", config)
    assert first["steps"] == 2 and first["finished"]
    config.steps = 4
    second = train_general(tmp_path / "run", config)
    assert second["steps"] == 4
    steps = [v["step"] for v in second["validation"]]
    assert steps == [2, 4]  # the first run's validation was kept: this run continued it
    saved = torch.load(tmp_path / "run" / "general.pt", weights_only=True)
    assert float(saved["working_spacing_mm"]) == 8.0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_validation"]["pairs"] == 2

    from DeepMultimodalRegLib.rso.weights import load_general_model

    model = load_general_model(tmp_path / "run" / "general.pt")
    assert model.trained_spacing_mm == 8.0
    assert next(model.parameters()).dtype == torch.float32


def test_shipped_general_model_is_listed_verified_and_registers(pelvis_ct):
    """`deepmmreg models` lists it; its SHA-256 matches; it lowers the misalignment of a held-out
    scan (the pelvis CT was never trained on) below the identity's."""
    from DeepMultimodalRegLib.rso import DeepRegistrationSession
    from DeepMultimodalRegLib.synthetic import smooth_random_deformation
    from DeepMultimodalRegLib.transforms.linear import AffineTransform
    from DeepMultimodalRegLib.transforms.resample import warp_volume
    from DeepMultimodalRegLib.weights.manifest import load_manifest, verify_weights

    entries = {e.name: e for e in load_manifest()}
    assert "general" in entries, "the general deep model is not shipped (weights/manifest.json)"
    entry = entries["general"]
    verify_weights(entry)
    assert entry.method == "deep" and entry.card_path.exists()
    coarse = pelvis_ct.geometry.resampled(4.0)
    fixed = warp_volume(pelvis_ct, AffineTransform.identity(), coarse, default_value=-1024.0)
    truth = smooth_random_deformation(coarse, 8.0, 70.0, seed=11)
    moving = warp_volume(fixed, truth, coarse, default_value=-1024.0)
    session = DeepRegistrationSession(fixed, moving, device="cpu")
    assert session.working_spacing_mm == pytest.approx(4.0)
    result = session.general()
    assert result.figures["loss_after"] < 0.8 * result.figures["loss_before"]
