"""SOPI's learned half: RTPI, the fine stage's eq. 6–7 training, per-patient training, `sopi` registration.

Everything runs on a tiny phantom CT (28³ voxels of 3 mm) and a 32² detector so the file takes
well under a minute on one core; accuracy on real CTs is the benchmark's job, not these tests'.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from DeepMultimodalRegLib.errors import InvalidParameterError, NotAvailableError
from DeepMultimodalRegLib.image import Volume
from DeepMultimodalRegLib.sopi.fine import (FineNet, FineConfig, direction_loss, drr_jacobian, fine_training_loss,
                                            geodesic_gradient, masked_feature_distance, pose_gradient)
from DeepMultimodalRegLib.sopi.geometry import CarmGeometry
from DeepMultimodalRegLib.sopi.optimize import OptimizerSettings
from DeepMultimodalRegLib.sopi.patient import PatientKit, structure_mask
from DeepMultimodalRegLib.sopi.pose import geodesic_distance
from DeepMultimodalRegLib.sopi.register import register_2d3d
from DeepMultimodalRegLib.sopi.simulate import simulate_xray
from DeepMultimodalRegLib.training.sopi_data import sample_poses, xray_like
from DeepMultimodalRegLib.training.sopi_train import (SopiNetworks, SopiTrainingConfig, rtpi_loss, train_sopi)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest

TINY = dict(detector=32, ct_mm=6.0, ct_cube=16, similarity_size=16, similarity_ct_mm=6.0, rtpi_batch=4,
            fine_batch=2, rtpi_width=8, fine_width=4, validation_cases=2, fine_iterations=4, checkpoint_every=5)
GEOMETRY = CarmGeometry()  # the paper's C-arm; the tiny models use it at 32²


def phantom(shift_hu: float = 0.0) -> Volume:
    """A water ellipsoid with a bony rod along z (the "spine") and a cross bar, in HU."""
    rng = np.random.default_rng(0)
    n = 28
    c = np.arange(n) - (n - 1) / 2
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    hu = np.where(xx ** 2 + yy ** 2 + (zz / 1.3) ** 2 < 11 ** 2, 40.0, -1000.0)
    hu[(np.abs(xx - 2) < 2.5) & (np.abs(yy + 1) < 2.5)] = 900.0
    hu[(np.abs(zz - 5) < 1.5) & (np.abs(yy) < 6) & (xx > -8) & (xx < 3)] = 700.0
    hu += rng.normal(0, 5, hu.shape) + shift_hu
    return Volume.from_numpy(hu.astype(np.float32), spacing=(3.0, 3.0, 3.0), origin=(-40.0, -40.0, 100.0),
                             name="phantom")


@pytest.fixture(scope="module")
def ct():
    return phantom()


@pytest.fixture(scope="module")
def kit(ct):
    return PatientKit.build(ct, structure_mask(ct), GEOMETRY.resized(32), 6.0, 8, 16, with_bone=True)


@pytest.fixture(scope="module")
def model_dir(ct, tmp_path_factory):
    out = tmp_path_factory.mktemp("sopi_model")
    summary = train_sopi(ct, structure_mask(ct), GEOMETRY, out, SopiTrainingConfig(rtpi_steps=6, fine_steps=3, **TINY))
    return out, summary


# ---------------------------------------------------------------------------------- SE(3) and eq. 7
def test_geodesic_gradient_points_away_from_the_true_pose():
    truth = torch.tensor([[5.0, -3.0, 2.0, 10.0, -4.0, 6.0]], dtype=torch.float64)
    # pure translation offset: V'_t along the offset, V'_r zero
    v = geodesic_gradient(truth + torch.tensor([[0, 0, 0, 4.0, 0, 0]]), truth)
    assert v[0, :3].norm() < 1e-6 * v[0, 3:].norm()
    assert torch.allclose(v[0, 3:] / v[0, 3:].norm(), torch.tensor([1.0, 0, 0], dtype=torch.float64), atol=1e-6)
    # it is the gradient of ½ d² (finite differences), and a small step against it shortens the geodesic
    pose = truth + torch.tensor([[4.0, 2.0, -3.0, 5.0, 8.0, -2.0]], dtype=torch.float64)
    v = geodesic_gradient(pose, truth)

    def half_sq(p):
        return 0.5 * float(geodesic_distance(p, truth, 100.0) ** 2)

    for k in range(6):
        e = torch.zeros(1, 6, dtype=torch.float64)
        e[0, k] = 1e-4
        assert (half_sq(pose + e) - half_sq(pose - e)) / 2e-4 == pytest.approx(float(v[0, k]), rel=1e-4, abs=1e-7)
    assert float(geodesic_distance(pose - 1e-3 * v, truth)) < float(geodesic_distance(pose, truth))


def test_eq7_loss_is_minimal_along_the_geodesic_and_maximal_against_it():
    target = torch.tensor([[0.3, -0.2, 0.9, 2.0, -1.0, 0.5]], dtype=torch.float64)
    assert float(direction_loss(target, target)) == pytest.approx(0.0, abs=1e-9)
    # only directions count, rotation and translation normalised separately
    scaled = torch.cat([7.0 * target[:, :3], 0.01 * target[:, 3:]], dim=1)
    assert float(direction_loss(scaled, target)) == pytest.approx(0.0, abs=1e-9)
    assert float(direction_loss(-target, target)) == pytest.approx(4.0)
    # rotation right, translation reversed: 0 + 2; perpendicular parts: √2 each
    mixed = torch.cat([target[:, :3], -target[:, 3:]], dim=1)
    assert float(direction_loss(mixed, target)) == pytest.approx(2.0)
    perpendicular = torch.tensor([[1.0, 0, 0, 0, 1.0, 0]], dtype=torch.float64)
    assert float(direction_loss(perpendicular, torch.tensor([[0, 1.0, 0, 0, 0, 1.0]]))) == pytest.approx(
        2 * math.sqrt(2))
    random = torch.randn(200, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    values = direction_loss(random, target.expand(200, -1))
    assert bool((values >= 0).all() and (values <= 4).all())


def test_masked_feature_distance_only_counts_the_mask():
    e_f = torch.zeros(1, 3, 4, 4)
    e_m = torch.zeros(1, 3, 4, 4)
    e_m[0, :, 0, 0] = torch.tensor([3.0, 4.0, 0.0])  # distance 5 at one pixel
    mask = torch.zeros(1, 4, 4)
    assert float(masked_feature_distance(e_m, e_f, mask)) == pytest.approx(5 / 16, abs=1e-3)  # empty mask: whole image
    mask[0, 0, :2] = 1
    assert float(masked_feature_distance(e_m, e_f, mask)) == pytest.approx(2.5, abs=1e-3)
    mask[0, 0, 0] = 0
    assert float(masked_feature_distance(e_m, e_f, mask)) == pytest.approx(0.0, abs=1e-3)


def test_pose_gradient_by_jacobian_matches_autograd_through_the_projector(kit):
    """V = Jᵀ·∂L_N/∂I_m (what training differentiates twice) equals ∂L_N/∂θ through the projector."""
    torch.manual_seed(0)
    net = FineNet(FineConfig(image_size=32, width=4))
    pose = torch.tensor([[4.0, -3.0, 6.0, 10.0, 5.0, -4.0]], dtype=torch.float64)
    xray = kit.render(torch.zeros(1, 6, dtype=torch.float64))
    mask = kit.mask_render(pose)
    e_f = net.xray_encoder(xray[:, None])
    drr, jac = drr_jacobian(kit.render, pose)
    _, v = pose_gradient(net, drr, jac, e_f, mask, create_graph=False)
    p = pose.clone().requires_grad_(True)
    l_n = masked_feature_distance(net.drr_encoder(kit.render(p)[:, None]), e_f, mask).sum()
    (exact,) = torch.autograd.grad(l_n, p)
    cosine = float((v * exact).sum() / (v.norm() * exact.norm()))
    assert cosine > 0.98, (v, exact)
    # with create_graph the eq. 7 loss reaches the encoders' weights (the double backward)
    loss, _ = fine_training_loss(net, kit.render, kit.mask_render, xray, pose, torch.zeros(1, 6, dtype=torch.float64))
    loss.backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in net.drr_encoder.parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in net.xray_encoder.parameters())


# ---------------------------------------------------------------------------------- training lowers the losses
def test_pose_sampler_redraws_only_the_implausible_poses(kit):
    """One spread per pose (the fine stage's offsets); wide ones get re-drawn without touching the others."""
    from DeepMultimodalRegLib.training.sopi_data import plausible_poses

    sigma = torch.tensor([[2.0, 2, 2, 5, 5, 5]] * 3 + [[20.0, 20, 20, 400, 400, 400]], dtype=torch.float64)
    for seed in range(3):
        poses = sample_poses(torch.Generator().manual_seed(seed), 4, kit.projector, sigma=sigma,
                             center=torch.zeros(4, 6, dtype=torch.float64))
        assert poses.shape == (4, 6) and bool(plausible_poses(kit.projector, poses).all())
        assert float(poses[:3, 3:].abs().max()) < 40  # the narrow rows kept their own spread


def test_a_tiny_training_run_lowers_the_rtpi_and_fine_losses(ct, kit):
    """Fixed batches, a few Adam steps: both stages' losses go down (the gradients reach every part)."""
    from DeepMultimodalRegLib.sopi.drr import DRRProjector

    config = SopiTrainingConfig(**TINY)
    torch.manual_seed(0)
    nets = SopiNetworks(config)
    similarity = DRRProjector(kit.ct, GEOMETRY.resized(16), step_mm=6.0)

    def rtpi_fixed():
        return rtpi_loss(nets, kit, similarity, config, torch.Generator().manual_seed(1))[0]

    optimiser = torch.optim.Adam(nets.rtpi.parameters(), lr=3e-3)
    first = rtpi_fixed().item()
    for _ in range(12):
        optimiser.zero_grad()
        rtpi_fixed().backward()
        optimiser.step()
    assert rtpi_fixed().item() < 0.8 * first

    g = torch.Generator().manual_seed(2)
    truth = sample_poses(g, 2, kit.projector)
    start = sample_poses(g, 2, kit.projector, sigma=(6.0, 6.0, 6.0, 10.0, 8.0, 8.0), center=truth)
    xrays = xray_like(kit, truth, g)

    def fine_fixed():
        return fine_training_loss(nets.fine, kit.render, kit.mask_render, xrays, start, truth)[0]

    optimiser = torch.optim.Adam(nets.fine.parameters(), lr=1e-3)
    first = fine_fixed().item()
    for _ in range(10):
        optimiser.zero_grad()
        fine_fixed().backward()
        optimiser.step()
    assert fine_fixed().item() < 0.85 * first, first  # eq. 7 is in [0, 4]; the untrained field scores ≈ 2.4 here


# ---------------------------------------------------------------------------------- model folder and registration
def test_training_writes_a_checked_model_folder_and_resumes(ct, model_dir, tmp_path):
    out, summary = model_dir
    for name in ("rtpi.pt", "fine.pt", "structure_mask.nii.gz", "sopi_model.json", "SHA256SUMS", "model_card.md",
                 "checkpoint.pt"):
        assert (out / name).is_file(), name
    assert summary["rtpi_steps"] == 6 and summary["fine_steps"] == 3 and summary["finished"]
    assert summary["final_rtpi"] is not None and summary["final_fine"] is not None
    card = (out / "model_card.md").read_text(encoding="utf-8")
    assert "Validation" in card and "phantom" in card
    from DeepMultimodalRegLib.weights.manifest import sha256_of

    sums = dict(line.split()[::-1] for line in (out / "SHA256SUMS").read_text().splitlines())
    assert sums == {n: sha256_of(out / n) for n in ("rtpi.pt", "fine.pt")}
    # resume: a copy of the run continues from its checkpoint instead of starting over
    import shutil

    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    more = train_sopi(ct, structure_mask(ct), GEOMETRY, copy, SopiTrainingConfig(rtpi_steps=6, fine_steps=5, **TINY))
    assert more["rtpi_steps"] == 6 and more["fine_steps"] == 5
    assert [list(h) for h in more["rtpi_history"]] == [list(h) for h in summary["rtpi_history"]]
    assert [list(h) for h in more["fine_history"][:3]] == [list(h) for h in summary["fine_history"]]


def test_register_sopi_and_sopi_opt_end_to_end(ct, model_dir, tmp_path):
    out, _ = model_dir
    geometry = GEOMETRY.resized(48)  # the X-ray's own pixel count may differ from the model's detector
    truth = np.array([3.0, 2.0, -4.0, 10.0, 5.0, -3.0])
    xray = simulate_xray(ct, geometry, truth, seed=1)
    result = register_2d3d(ct, xray, geometry, method="sopi", model_dir=out, device="cpu")
    assert result.pose.shape == (6,) and np.all(np.isfinite(result.pose))
    assert result.figures["fine_iterations"] > 0 and "rtpi_pose" in result.figures
    paths = result.save(tmp_path / "sopi")
    pose = json.loads(paths["pose"].read_text())
    assert set(pose) == {"rx", "ry", "rz", "tx", "ty", "tz"}
    assert all((tmp_path / "sopi" / f).is_file() for f in ("transform.tfm", "drr.nii.gz", "report.png", "report.json"))
    fast = OptimizerSettings(coarse_size=16, fine_size=24, coarse_ct_mm=6.0, fine_ct_mm=6.0, starts=4, keep=1,
                             coarse_evaluations=20, fine_evaluations=20)
    both = register_2d3d(ct, xray, geometry, method="sopi+opt", model_dir=out, device="cpu", settings=fast)
    assert both.figures["sopi_pose"] == result.figures["sopi_pose"]  # the same SOPI start, then opt-gc
    assert both.figures["evaluations"] > result.figures["evaluations"]


def test_missing_or_mismatched_model_gives_a_clear_error(ct, model_dir, tmp_path, capsys):
    out, _ = model_dir
    xray = simulate_xray(ct, GEOMETRY.resized(32), np.zeros(6), seed=0)
    with pytest.raises(NotAvailableError, match="train sopi"):
        register_2d3d(ct, xray, GEOMETRY.resized(32), method="sopi")
    with pytest.raises(InvalidParameterError, match="not a SOPI model folder"):
        register_2d3d(ct, xray, GEOMETRY.resized(32), method="sopi", model_dir=tmp_path / "nothing")
    with pytest.raises(InvalidParameterError, match="trained for the CT"):
        register_2d3d(phantom(shift_hu=30.0), xray, GEOMETRY.resized(32), method="sopi", model_dir=out)
    other = CarmGeometry(source_to_isocenter_mm=700.0).resized(32)
    with pytest.raises(InvalidParameterError, match="another C-arm geometry"):
        register_2d3d(ct, xray, other, method="sopi", model_dir=out)
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    with open(broken / "fine.pt", "ab") as f:
        f.write(b"x")
    with pytest.raises(InvalidParameterError, match="SHA-256"):
        register_2d3d(ct, xray, GEOMETRY.resized(32), method="sopi", model_dir=broken)
    # the command line: one line, exit code 2, nothing written
    from DeepMultimodalRegLib.cli.main import main
    from DeepMultimodalRegLib.sopi.geometry import write_geometry
    from DeepMultimodalRegLib.sopi.xray import write_drr

    ct_path = tmp_path / "ct.nii.gz"
    from DeepMultimodalRegLib.image import write_volume

    write_volume(ct, ct_path)
    geometry_path = write_geometry(GEOMETRY.resized(32), tmp_path / "g.json")
    xray_path = write_drr(xray, GEOMETRY.resized(32), tmp_path / "x.nii.gz")
    code = main(["register2d3d", str(ct_path), str(xray_path), "--geometry", str(geometry_path), "--method", "sopi",
                 "--model", str(tmp_path / "nothing"), "-o", str(tmp_path / "reg")])
    assert code == 2 and "not a SOPI model folder" in capsys.readouterr().err
    assert not (tmp_path / "reg").exists()
    code = main(["register2d3d", str(ct_path), str(xray_path), "--geometry", str(geometry_path),  # with --model
                 "--model", str(tmp_path / "nothing"), "-o", str(tmp_path / "reg")])             # sopi+opt by default
    assert code == 2 and "not a SOPI model folder" in capsys.readouterr().err
