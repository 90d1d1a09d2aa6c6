"""The DISA training teacher: its whole-volume map agrees with its patch route, it explains LC² on a
real multi-contrast pair far better than chance, it survives a save/load, and distillation steps
lower their loss."""

from __future__ import annotations

import pytest
import torch

from DeepMultimodalRegLib.metrics.lc2 import DISA_RADII
from DeepMultimodalRegLib.metrics.local_stats import extract_patches, gradient_magnitude
from DeepMultimodalRegLib.networks.disa_net import DISANet, clip_descriptor_norm
from DeepMultimodalRegLib.training.disa_teacher import (LandmarkTeacher, PatchSet, build_teacher,
                                                       directional_targets, rotated_crop_with_targets, sample_patches,
                                                       symmetric_targets, teacher_targets_for_crop)


@pytest.fixture(scope="module")
def prepared_pair(sample_t1, sample_t2):
    from DeepMultimodalRegLib.disa.preprocess import prepare_for_disa

    return prepare_for_disa(sample_t1).data, prepare_for_disa(sample_t2).data


@pytest.fixture(scope="module")
def small_teacher(prepared_pair):
    teacher, report = build_teacher(list(prepared_pair), torch.Generator().manual_seed(0), landmarks=48,
                                    fit_patches_per_volume=150, fit_steps=150)
    return teacher, report


def _patches_at(volume: torch.Tensor, centres: torch.Tensor) -> PatchSet:
    x = (volume.double() - volume.double().mean()) / volume.double().std()
    grad = gradient_magnitude(x)
    return PatchSet({r: extract_patches(x, centres, r) for r in DISA_RADII},
                    {r: extract_patches(grad, centres, r) for r in DISA_RADII})


def test_volume_map_equals_the_patch_route_at_descriptor_sites(prepared_pair, small_teacher):
    """Site (k, j, i) of the map is the teacher's embedding of the patch around voxel 4·(k, j, i)."""
    teacher, _ = small_teacher
    t2 = prepared_pair[1]
    embedding = teacher.embed_volume(t2)
    assert embedding.shape == (16, *(-(-n // 4) for n in t2.shape))
    assert float(embedding.norm(dim=0).max()) <= 1 + 1e-5
    sites = torch.tensor([[10, 12, 9], [14, 16, 14], [8, 20, 11], [18, 10, 15]])
    features = symmetric_targets(_patches_at(t2, 4 * sites), teacher.landmarks)  # [4, L]
    expected = clip_descriptor_norm((features @ teacher.projection).T, dim=0).T.float()
    got = embedding[:, sites[:, 0], sites[:, 1], sites[:, 2]].T
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_teacher_dot_products_explain_lc2_between_contrasts(prepared_pair, small_teacher):
    """On patches of the sample T1 and T2 that the teacher was not fitted on, the dot products of the
    teacher's embeddings correlate with the directional DISA targets (the network trained by the
    pairwise loss for 53 CPU minutes reaches r ≈ 0.34 on held-out scans; an unrelated embedding ≈ 0)."""
    teacher, report = small_teacher
    assert report["weighted_loss_refined"] < report["weighted_loss_nystrom"]
    t1, t2 = prepared_pair
    fresh = [sample_patches([v], 120, torch.Generator().manual_seed(7 + i)) for i, v in enumerate((t1, t2))]
    targets = directional_targets(fresh[0], fresh[1])  # T1 patches fitted by T2 patches
    e1, e2 = (clip_descriptor_norm(symmetric_targets(p, teacher.landmarks) @ teacher.projection, dim=1) for p in fresh)
    predicted = e1 @ e2.T
    r = float(torch.corrcoef(torch.stack([predicted.reshape(-1), targets.reshape(-1)]))[0, 1])
    assert r > 0.6, r


def test_teacher_round_trips_through_a_weights_only_file(small_teacher, tmp_path):
    teacher, _ = small_teacher
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    loaded = LandmarkTeacher.from_state_dict(torch.load(tmp_path / "teacher.pt", weights_only=True))
    assert torch.equal(loaded.projection, teacher.projection)
    assert all(torch.equal(loaded.landmarks.gradient[r], teacher.landmarks.gradient[r]) for r in DISA_RADII)


def test_crop_targets_are_the_descriptor_grid_slice(small_teacher):
    embedding = torch.arange(16 * 30 * 30 * 30, dtype=torch.float32).reshape(16, 30, 30, 30)
    got = teacher_targets_for_crop(embedding, (8, 0, 20), 65)
    assert torch.equal(got, embedding[:, 2:19, 0:17, 5:22])
    with pytest.raises(ValueError, match="multiples of 4"):
        teacher_targets_for_crop(embedding, (6, 0, 0), 65)


def test_rotated_crops_follow_the_anatomy():
    """Identity: the plain crop and map slice.  A quarter turn about the k axis lands on voxel centres,
    so crop and targets are exact permutations/flips of the upright ones, and each target is the
    teacher's value at the scan point the crop voxel shows."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(80, 84, 88, generator=g)
    embedding = torch.randn(16, 20, 21, 22, generator=g)
    corner, side = (8, 4, 12), 33
    image, targets = rotated_crop_with_targets(data, embedding, corner, side, torch.eye(3))
    assert torch.allclose(image, data[8:41, 4:37, 12:45], atol=1e-5)
    assert torch.allclose(targets, teacher_targets_for_crop(embedding, corner, side), atol=1e-5)
    quarter = torch.tensor([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])  # (k, j, i) → (k, −i, j) about the centre
    image, targets = rotated_crop_with_targets(data, embedding, corner, side, quarter)
    upright = data[8:41, 4:37, 12:45]
    # crop voxel (k, j, i) shows the scan at centre + R·(offset): j' = −i offset, i' = +j offset
    assert torch.allclose(image, upright.flip(1).transpose(1, 2), atol=1e-4)  # image[k, j, i] = upright[k, 32 − i, j]
    assert torch.allclose(targets, teacher_targets_for_crop(embedding, corner, side).flip(2).transpose(2, 3), atol=1e-4)


def test_distillation_steps_lower_their_loss(prepared_pair, small_teacher, tmp_path, monkeypatch):
    """A few distillation steps of the real recipe (two tiny scans, the small teacher) lower the loss."""
    import DeepMultimodalRegLib.training.disa_train as disa_train
    from DeepMultimodalRegLib.image import ImageGeometry, Volume

    teacher, _ = small_teacher
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")  # the run finds it and does not build its own
    scans = {name: Volume(data, ImageGeometry(shape=tuple(data.shape)))
             for name, data in zip(("kirby21_t1", "kirby21_t2"), prepared_pair)}
    config = disa_train.DisaTrainingConfig(distil_steps=12, steps=12, warmup_steps=1, learning_rate=1e-3)
    maps = disa_train.prepare_teacher(tmp_path, scans, config, torch.device("cpu"))
    assert sorted(p.name for p in (tmp_path / "teacher_maps").iterdir()) == ["kirby21_t1.pt", "kirby21_t2.pt"]
    torch.manual_seed(0)
    model = DISANet()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)

    def batch_loss(seed: int) -> torch.Tensor:
        return disa_train.distillation_batch_loss(model, scans, maps, config, torch.Generator().manual_seed(seed))

    with torch.no_grad():
        start = float(sum(batch_loss(s) for s in range(3)))
    for step in range(12):
        optimiser.zero_grad()
        batch_loss(100 + step).backward()
        optimiser.step()
    with torch.no_grad():
        end = float(sum(batch_loss(s) for s in range(3)))
    assert end < 0.7 * start, (start, end)
