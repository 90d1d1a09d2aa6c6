"""DISA training: the sampler's targets against the LC² oracle, the sampler's spread, augmentations
that leave targets unchanged, a tiny run that lowers the loss, resumable checkpoints, publishing."""

from __future__ import annotations

import json

import pytest
import torch

from DeepMultimodalRegLib.metrics import disa_target
from DeepMultimodalRegLib.networks.disa_net import DISANet
from DeepMultimodalRegLib.training.disa_sampler import (CROP, Augmentation, equalised_weights, sample_crop_pair,
                                                        sample_dense_crop_pair, site_indices,
                                                        t_sampling_weights, targets_against_all_sites)
from DeepMultimodalRegLib.training.disa_train import dense_loss
from conftest import require_shared_data  # the Testing folder is on the path


@pytest.fixture(scope="module")
def prepared_pair(sample_t1, sample_t2):
    from DeepMultimodalRegLib.disa.preprocess import prepare_for_disa

    return prepare_for_disa(sample_t1).data, prepare_for_disa(sample_t2).data


def test_targets_equal_the_lc2_oracle_pair_by_pair(prepared_pair):
    t1, t2 = prepared_pair
    f, r = t1[20:20 + CROP, 30:30 + CROP, 20:20 + CROP], t2[25:25 + CROP, 20:20 + CROP, 30:30 + CROP]
    sites = site_indices()
    g = torch.Generator().manual_seed(0)
    anchors = sites[torch.randint(0, len(sites), (12, 3), generator=g)]
    partners = torch.randint(0, len(sites), (12, 3), generator=g)
    all_targets = targets_against_all_sites(f, r, anchors)
    ours = all_targets[torch.arange(12), partners[:, 0], partners[:, 1], partners[:, 2]]
    assert torch.allclose(ours.double(), disa_target(f, r, anchors, sites[partners]).double(), atol=1e-5)


def test_sampler_spreads_targets_and_aligned_crops_reach_high_values(prepared_pair):
    t1, t2 = prepared_pair
    g = torch.Generator().manual_seed(1)
    unrelated = sample_crop_pair(t1, t2, 256, g, aligned=False).targets
    aligned = sample_crop_pair(t1, t2, 256, g, aligned=True).targets
    both = torch.cat([unrelated, aligned])
    assert both.min() >= 0 and both.max() <= 1
    assert float(both.std()) > 0.1  # not collapsed onto one value
    assert float(aligned.max()) > 0.6  # co-registered T1/T2 patches are well explained by each other


def test_augmentation_leaves_lc2_targets_unchanged(prepared_pair):
    t1, t2 = prepared_pair
    f, r = t1[20:20 + CROP, 30:30 + CROP, 20:20 + CROP], t2[20:20 + CROP, 30:30 + CROP, 20:20 + CROP]
    sites = site_indices()
    anchors = sites[torch.tensor([[3, 4, 5], [6, 2, 8], [5, 5, 5]])]
    before = targets_against_all_sites(f, r, anchors)
    aug = Augmentation.random(torch.Generator().manual_seed(3))
    fa, ra = aug.image(f, 0), aug.image(r, 1)
    # where the anchors went: apply the same symmetry to an index volume
    index = torch.arange(CROP ** 3).reshape(CROP, CROP, CROP)
    moved = aug.image(index.double(), 0)
    a_scale, a_shift = aug.intensity[0]
    new_anchor = []
    for k, j, i in anchors.tolist():
        value = a_scale * index[k, j, i] + a_shift
        new_anchor.append((moved - value).abs().argmin().item())
    new_anchor = torch.tensor([[v // CROP ** 2, (v // CROP) % CROP, v % CROP] for v in new_anchor])
    after = targets_against_all_sites(fa, ra, new_anchor)
    after = aug.undo_on_descriptors(after[:, None])[:, 0]
    assert torch.allclose(before, after, atol=1e-4)


def test_equalised_weights_give_every_target_bin_the_same_weight():
    targets = torch.cat([torch.full((90,), 0.05), torch.full((9,), 0.55), torch.tensor([0.97])])
    w = equalised_weights(targets)
    assert torch.isclose(w.sum(), torch.tensor(1.0))
    for value in (0.05, 0.55, 0.97):
        assert torch.isclose(w[targets == value].sum(), torch.tensor(1 / 3))


def test_t_sampling_weights_are_the_cells_of_the_closest_target_rule():
    # one anchor: t ~ U[0, 1] picks the closest target, so 0.1 owns [0, 0.2], the two 0.3s share
    # [0.2, 0.55] and 0.8 owns [0.55, 1]; the second anchor's weights are its own, and each
    # anchor sums to 1/K
    targets = torch.tensor([[0.3, 0.1, 0.8, 0.3], [0.0, 0.0, 0.0, 0.4]])
    w = t_sampling_weights(targets)
    expected = torch.tensor([[0.175, 0.2, 0.45, 0.175], [0.2 / 3, 0.2 / 3, 0.2 / 3, 0.8]]) / 2
    assert torch.allclose(w, expected, atol=1e-6)


def test_t_sampling_weights_match_the_paper_sampler_drawn_many_times():
    g = torch.Generator().manual_seed(3)
    targets = torch.rand(3, 2, 2, 5, generator=g) * 0.7  # [K, S, S, S]-like; no ties
    w = t_sampling_weights(targets).reshape(3, -1) * 3
    t = torch.rand(100_000, generator=g)
    for k in range(3):
        picked = (targets[k].reshape(-1)[None] - t[:, None]).abs().argmin(1)
        frequency = torch.bincount(picked, minlength=20).float() / t.numel()
        assert torch.allclose(frequency, w[k], atol=0.006)


def test_dense_targets_agree_with_the_t_sampled_ones(prepared_pair):
    t1, t2 = prepared_pair
    dense = sample_dense_crop_pair(t1, t2, 8, torch.Generator().manual_seed(5), aligned=True)
    first = int(site_indices()[0]) // 4
    sites = site_indices()
    anchors_voxels = sites[dense.anchors[:3] - first]
    oracle = disa_target(dense.fitted, dense.regressor, anchors_voxels,
                         sites[torch.tensor([[0, 0, 0], [5, 5, 5], [10, 2, 7]])])
    ours = dense.targets[torch.arange(3), torch.tensor([0, 5, 10]), torch.tensor([0, 5, 2]), torch.tensor([0, 5, 7])]
    assert torch.allclose(ours.double(), oracle.double(), atol=1e-5)


def test_tiny_training_run_lowers_the_loss(prepared_pair):
    t1, t2 = prepared_pair
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    pair = sample_dense_crop_pair(t1, t2, 128, g, aligned=True)
    model = DISANet()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-4)

    def loss_of():
        return dense_loss(model, pair, None)

    with torch.no_grad():
        start = float(loss_of())
    for _ in range(15):
        optimiser.zero_grad()
        loss_of().backward()
        optimiser.step()
    with torch.no_grad():
        end = float(loss_of())
    assert end < 0.5 * start, (start, end)



def test_sign_symmetric_training_descriptors_ignore_the_sign_of_each_crop(prepared_pair):
    from dataclasses import replace

    from DeepMultimodalRegLib.training.disa_train import crop_descriptors

    t1, t2 = prepared_pair
    pair = sample_dense_crop_pair(t1, t2, 16, torch.Generator().manual_seed(5), aligned=True)
    torch.manual_seed(1)
    model = DISANet().eval()
    flipped = replace(pair, regressor=-pair.regressor)
    with torch.no_grad():
        sym = crop_descriptors(model, pair, None, sign_symmetric=True)
        assert torch.allclose(sym, crop_descriptors(model, flipped, None, sign_symmetric=True), atol=1e-6)
        raw = crop_descriptors(model, pair, None)
        assert not torch.allclose(raw, crop_descriptors(model, flipped, None), atol=1e-3)
        both = torch.stack([pair.fitted, pair.regressor])[:, None]
        assert torch.allclose(sym, 0.5 * (model(both) + model(-both)), atol=1e-6)

def test_publish_writes_manifest_card_and_loads_by_checksum(tmp_path, monkeypatch):
    from DeepMultimodalRegLib.networks import load_disa_network
    from DeepMultimodalRegLib.training.publish import publish_weights
    from DeepMultimodalRegLib.weights import manifest

    monkeypatch.setattr(manifest, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(manifest, "MANIFEST", tmp_path / "manifest.json")
    model = DISANet()
    src = tmp_path / "trained.pt"
    torch.save(model.state_dict(), src)
    entry = publish_weights(src, "disa", "disa", "# card\n")
    assert entry.parameters == 90_752
    listed = json.loads((tmp_path / "manifest.json").read_text())["models"]
    assert [m["name"] for m in listed] == ["disa"] and listed[0]["sha256"] == entry.sha256
    loaded = load_disa_network("disa")
    x = torch.randn(1, 1, 16, 16, 16)
    model.eval()
    assert torch.allclose(loaded(x), model(x))
    # a replaced weights file is refused, naming the file
    torch.save(DISANet().state_dict(), tmp_path / "disa.pt")
    with pytest.raises(Exception, match="disa.pt"):
        load_disa_network("disa")


def test_training_checkpoints_and_resumes(prepared_pair, tmp_path, monkeypatch):
    import DeepMultimodalRegLib.training.disa_train as disa_train
    from DeepMultimodalRegLib.image import ImageGeometry, Volume
    from DeepMultimodalRegLib.training.disa_train import DisaTrainingConfig, train_disa

    t1, t2 = prepared_pair
    scans = {"kirby21_t1": Volume(t1, ImageGeometry(shape=tuple(t1.shape))),
             "kirby21_t2": Volume(t2, ImageGeometry(shape=tuple(t2.shape)))}
    monkeypatch.setattr(disa_train, "load_prepared_scans", lambda *args, **kwargs: dict(scans))
    config = DisaTrainingConfig(steps=2, anchors_per_crop=8, validation_crop_pairs=1, warmup_steps=1,
                                checkpoint_every=1, validation_every=1)
    first = train_disa(tmp_path, config)
    assert first["steps"] == 2 and first["finished"]
    before = torch.load(tmp_path / "disa.pt", weights_only=True)
    config.steps = 3
    second = train_disa(tmp_path, config)  # resumes at step 2, runs one more
    assert second["steps"] == 3
    after = torch.load(tmp_path / "disa.pt", weights_only=True)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert [v["step"] for v in second["validation"]] == [1, 2, 3]


def test_prepared_scan_cache_is_versioned_so_old_preparations_are_not_reused(tmp_path):
    """A cache written before a change to how scans are read (e.g. the voxelmorph orientation fix)
    must not be picked up by a resumed run: only files of the current format are read."""
    from DeepMultimodalRegLib.training.scans import PREPARED_FORMAT, SCANS, load_prepared_scans

    def save(path, value):
        torch.save({"data": torch.full((4, 4, 4), value), "spacing": torch.tensor([2.0, 2.0, 2.0]),
                    "origin": torch.zeros(3), "direction": torch.eye(3).reshape(-1)}, path)

    names = [s.name for s in SCANS if s.split == "validation"]
    for name in names:
        save(tmp_path / f"{name}_2mm.pt", 1.0)  # the pre-versioning file name
        save(tmp_path / f"{name}_2mm_v{PREPARED_FORMAT}.pt", 2.0)
    scans = load_prepared_scans(tmp_path / "no_data_needed", "validation", 2.0, tmp_path)
    assert sorted(scans) == sorted(names)
    assert all(float(v.data.min()) == 2.0 for v in scans.values())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_training_runs_on_the_chosen_device_and_draws_the_same_pairs_there(prepared_pair, tmp_path, monkeypatch,
                                                                          device):
    """A seed draws the same crops, anchors and targets on every device (the sampling generator stays
    on the CPU), and the saved weights are CPU tensors whatever the device."""
    import DeepMultimodalRegLib.training.disa_train as disa_train
    from DeepMultimodalRegLib.image import ImageGeometry, Volume
    from DeepMultimodalRegLib.training.disa_train import DisaTrainingConfig, train_disa, validation_set

    t1, t2 = prepared_pair
    scans = {"kirby21_t1": Volume(t1, ImageGeometry(shape=tuple(t1.shape))),
             "kirby21_t2": Volume(t2, ImageGeometry(shape=tuple(t2.shape)))}
    monkeypatch.setattr(disa_train, "load_prepared_scans", lambda *args, **kwargs: dict(scans))
    config = DisaTrainingConfig(steps=2, anchors_per_crop=8, validation_crop_pairs=2, warmup_steps=1,
                                checkpoint_every=1, validation_every=1, device=device)
    on_cpu = validation_set(config, None, None, torch.device("cpu"))
    on_device = validation_set(config, None, None, torch.device(device))
    for a, b in zip(on_cpu, on_device):
        assert torch.equal(a.anchors, b.anchors.cpu()) and torch.equal(a.partners, b.partners.cpu())
        assert torch.allclose(a.targets, b.targets.cpu(), atol=1e-5)
    summary = train_disa(tmp_path, config)
    assert summary["device"].startswith(device) and summary["steps"] == 2
    weights = torch.load(tmp_path / "disa.pt", weights_only=True)
    assert all(v.device.type == "cpu" for v in weights.values())


def test_an_unknown_loss_weighting_is_refused_before_any_work(tmp_path):
    from DeepMultimodalRegLib.errors import InvalidParameterError
    from DeepMultimodalRegLib.training.disa_train import DisaTrainingConfig, train_disa

    with pytest.raises(InvalidParameterError, match="loss weighting"):
        train_disa(tmp_path / "run", DisaTrainingConfig(loss_weighting="uniform"), data_dir=tmp_path / "missing")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_cli_flags_reach_the_training_config(tmp_path):
    """`train disa` flags land in the recipe's config (what a model card's command line relies on)."""
    from DeepMultimodalRegLib.cli.main import build_parser
    from DeepMultimodalRegLib.errors import InvalidParameterError
    from DeepMultimodalRegLib.training.disa_cli import config_from_args

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    args = build_parser().parse_args(["train", "disa", "-o", "x", "--loss-weighting", "t-sampling",
                                      "--learning-rate", "1e-4", "--crop-pairs-per-step", "4", "--device", "cpu",
                                      "--init-weights", str(weights), "--minutes", "5", "--steps", "300",
                                      "--sign-symmetric", "--output-init-scale", "8", "--synthetic-probability", "0.3",
                                      "--distil-steps", "200", "--teacher-landmarks", "64"])
    config = config_from_args(args)
    assert (config.distil_steps, config.teacher_landmarks) == (200, 64)
    assert (config.loss_weighting, config.learning_rate, config.crop_pairs_per_step, config.device,
            config.init_weights, config.max_minutes, config.steps, config.sign_symmetric,
            config.output_init_scale, config.synthetic_probability) == ("t-sampling", 1e-4, 4, "cpu", str(weights),
                                                                        5.0, 300, True, 8.0, 0.3)
    default = config_from_args(build_parser().parse_args(["train", "disa", "-o", "x"]))
    assert (default.loss_weighting, default.device, default.init_weights, default.sign_symmetric,
            default.output_init_scale, default.synthetic_probability) == ("bins", "auto", None, False, 1.0, 0.0)
    assert default.distil_steps == 0
    with pytest.raises(InvalidParameterError, match="--steps"):
        config_from_args(build_parser().parse_args(["train", "disa", "-o", "x", "--steps", "0"]))
    with pytest.raises(InvalidParameterError, match="initial weights not found"):
        config_from_args(build_parser().parse_args(["train", "disa", "-o", "x", "--init-weights",
                                                    str(tmp_path / "missing.pt")]))


def test_output_init_scale_starts_the_descriptors_larger():
    """A fresh network's descriptors have norms ~0.1 (PyTorch's default initialisation); the option
    scales the last layer, and so the pre-clipping descriptors, by its factor."""
    from DeepMultimodalRegLib.errors import InvalidParameterError
    from DeepMultimodalRegLib.networks.disa_net import DISANet
    from DeepMultimodalRegLib.training.disa_train import scale_output_layer

    torch.manual_seed(0)
    plain = DISANet()
    scaled = DISANet()
    scaled.load_state_dict(plain.state_dict())
    scale_output_layer(scaled, 8.0)
    x = torch.randn(1, 1, 33, 33, 33, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        raw = plain.layers(x)
        norms = plain(x).norm(dim=1)
        norms_scaled = scaled(x).norm(dim=1)
    assert torch.allclose(scaled.layers(x), 8 * raw, rtol=1e-5, atol=1e-6)
    assert float(norms.mean()) < 0.5 and float(norms_scaled.mean()) > 2 * float(norms.mean())
    assert float(norms_scaled.max()) <= 1 + 1e-6  # still clipped
    with pytest.raises(InvalidParameterError, match="output_init_scale"):
        scale_output_layer(plain, 0.0)


def test_model_card_states_the_loss_weighting_and_the_jitter_of_its_run():
    from dataclasses import asdict

    from DeepMultimodalRegLib.training.disa_train import DisaTrainingConfig
    from DeepMultimodalRegLib.training.publish import disa_model_card

    validation = {"pairs": 10, "mse": 0.04, "pearson": 0.4, "target_mean": 0.3, "target_std": 0.1}
    summary = {"steps": 5, "seconds": 60.0, "threads": 1, "finished": True, "train_mse_running": 0.05,
               "train_scans": ["a"], "validation_scans": ["b"], "final_validation": validation}
    card = disa_model_card({**summary, "config": asdict(DisaTrainingConfig())})
    assert "10 bins, equal total weight" in card and "shifted by up to" not in card
    tuned = asdict(DisaTrainingConfig(loss_weighting="t-sampling", aligned_jitter=2))
    card = disa_model_card({**summary, "config": tuned})
    assert "t-sampling picks it for its anchor" in card and "shifted by up to 2 voxels" in card
    assert "sign-symmetric" not in card
    card = disa_model_card({**summary, "config": asdict(DisaTrainingConfig(sign_symmetric=True))})
    assert "Trained on sign-symmetric descriptors" in card and "initialisation ×" not in card
    card = disa_model_card({**summary, "config": asdict(DisaTrainingConfig(output_init_scale=8.0))})
    assert "last layer's default initialisation × 8." in card and "Synthetic co-registered" not in card
    card = disa_model_card({**summary, "config": asdict(DisaTrainingConfig(synthetic_probability=0.3))})
    assert "Synthetic co-registered pairs in 30% of the steps" in card and "distillation" not in card
    teacher = {"weighted_loss_nystrom": 0.03, "weighted_loss_refined": 0.005}
    card = disa_model_card({**summary, "steps": 5, "teacher": teacher,
                            "config": asdict(DisaTrainingConfig(distil_steps=3, steps=5))})
    assert "Steps 1–3: distillation" in card and "0.0300 → 0.0050" in card and "follows from step 4" in card
    card = disa_model_card({**summary, "steps": 3, "config": asdict(DisaTrainingConfig(distil_steps=3, steps=3))})
    assert "ended inside this stage" in card


def _quantile_labels(image: torch.Tensor, classes: int = 4) -> torch.Tensor:
    """A label map for tests: the image's intensity quantile class (0 = darkest)."""
    edges = torch.quantile(image.reshape(-1)[::7].double(), torch.linspace(0, 1, classes + 1)[1:-1].double())
    return torch.bucketize(image.double(), edges).to(torch.int16)


def test_synthetic_pairs_show_one_place_in_two_new_contrasts(prepared_pair):
    """A synthetic training pair is two label-driven contrasts (or the scan and one) of the same crop:
    new intensities, same anatomy, so an anchor's own place scores above the typical site; the
    targets are the LC² oracle's; a seed draws the same pair."""
    from DeepMultimodalRegLib.training.disa_sampler import sample_synthetic_crop_pair

    t1 = prepared_pair[0]
    labels = _quantile_labels(t1)
    pairs = [sample_synthetic_crop_pair(t1, labels, 64, torch.Generator().manual_seed(s)) for s in range(3)]
    again = sample_synthetic_crop_pair(t1, labels, 64, torch.Generator().manual_seed(0))
    assert torch.equal(pairs[0].fitted, again.fitted) and torch.equal(pairs[0].targets, again.targets)
    for pair in pairs:
        assert pair.fitted.shape == pair.regressor.shape == (CROP,) * 3
        # z-scored new contrasts, not copies of each other
        assert abs(float(pair.regressor.mean())) < 1e-3 and abs(float(pair.regressor.std()) - 1) < 1e-3
        assert float(torch.corrcoef(torch.stack([pair.fitted.reshape(-1), pair.regressor.reshape(-1)]))[0, 1]) < 0.99
        own = pair.anchors - int(site_indices()[0]) // 4  # site-grid indices of the anchors
        same_place = pair.targets[torch.arange(64), own[:, 0], own[:, 1], own[:, 2]]
        typical = pair.targets.reshape(64, -1).median(1).values
        assert float((same_place > typical).float().mean()) > 0.8
        k = 5
        sites = site_indices()
        oracle = disa_target(pair.fitted, pair.regressor, sites[own[:k]], sites[own[:k]])
        assert torch.allclose(same_place[:k].double(), oracle.double(), atol=1e-4)


def test_training_with_synthetic_pairs_draws_them_and_refuses_bad_settings(prepared_pair, tmp_path, monkeypatch):
    import DeepMultimodalRegLib.training.disa_train as disa_train
    from DeepMultimodalRegLib.errors import InvalidParameterError
    from DeepMultimodalRegLib.image import ImageGeometry, Volume
    from DeepMultimodalRegLib.training.disa_train import DisaTrainingConfig, draw_training_pair, train_disa

    t1, t2 = prepared_pair
    geometry = ImageGeometry(shape=tuple(t1.shape))
    scans = {"kirby21_t1": Volume(t1, geometry), "kirby21_t2": Volume(t2, geometry)}
    labels = {"kirby21_t1": Volume(_quantile_labels(t1), geometry)}
    config = DisaTrainingConfig(anchors_per_crop=8, synthetic_probability=1.0)
    pairs = disa_train.pair_pool(sorted(scans))
    drawn = draw_training_pair(scans, labels, pairs, config, torch.Generator().manual_seed(0))
    # every crop of a synthetic pair is a new contrast or t1 itself, never t2
    assert not any(torch.equal(c, t2[k:k + CROP, j:j + CROP, i:i + CROP]) for c in (drawn.fitted, drawn.regressor)
                   for k in range(0, t2.shape[0] - CROP + 1, 4) for j in range(0, t2.shape[1] - CROP + 1, 4)
                   for i in range(0, t2.shape[2] - CROP + 1, 4))
    # probability 0 draws exactly what the earlier recipe drew (same generator sequence)
    plain = DisaTrainingConfig(anchors_per_crop=8)
    a = draw_training_pair(scans, labels, pairs, plain, torch.Generator().manual_seed(1))
    b = disa_train.draw_dense_crop_pair(scans, pairs, plain, torch.Generator().manual_seed(1))
    assert torch.equal(a.targets, b.targets) and torch.equal(a.anchors, b.anchors)

    monkeypatch.setattr(disa_train, "load_prepared_scans", lambda *args, **kwargs: dict(scans))
    monkeypatch.setattr(disa_train, "load_prepared_labels", lambda *args, **kwargs: dict(labels))
    summary = train_disa(tmp_path / "run", DisaTrainingConfig(steps=2, anchors_per_crop=8, validation_crop_pairs=1,
                                                              warmup_steps=1, synthetic_probability=0.5))
    assert summary["steps"] == 2 and summary["config"]["synthetic_probability"] == 0.5
    with pytest.raises(InvalidParameterError, match="synthetic_probability"):
        train_disa(tmp_path / "bad", DisaTrainingConfig(synthetic_probability=1.5))
    monkeypatch.setattr(disa_train, "load_prepared_labels", lambda *args, **kwargs: {})
    with pytest.raises(InvalidParameterError, match="labelled training scans"):
        train_disa(tmp_path / "none", DisaTrainingConfig(steps=1, synthetic_probability=0.5))


def test_prepared_label_maps_lie_on_their_scans(tmp_path):
    """The label maps synthetic contrasts are drawn from land on the prepared (2 mm) grid of their own
    scan: on MNI152, white matter is brighter than grey matter in the T1; on the voxelmorph T1 the
    left cerebral white matter (label 2) is brighter than the left cortex (3)."""
    from DeepMultimodalRegLib.training.scans import load_prepared_labels, load_prepared_scans

    require_shared_data()
    scans = {k: v for k, v in load_prepared_scans(None, "train", 2.0, tmp_path).items()
             if k in ("mni152_t1", "voxelmorph_t1")}
    labels = load_prepared_labels(scans, None, tmp_path)
    assert sorted(labels) == ["mni152_t1", "voxelmorph_t1"]
    for name, (bright, dark) in {"mni152_t1": (3, 2), "voxelmorph_t1": (2, 3)}.items():
        image, lab = scans[name].data, labels[name].data
        assert lab.shape == image.shape and labels[name].geometry.same_grid(scans[name].geometry)
        assert float(image[lab == bright].mean()) > float(image[lab == dark].mean()) + 0.5
    cached = load_prepared_labels(scans, None, tmp_path)  # from the cache now
    assert all(torch.equal(cached[k].data, labels[k].data) for k in labels)


def test_packed_scan_cache_is_read_without_the_data(tmp_path, monkeypatch):
    """A run's prepared-scan cache, packed into one archive and unpacked elsewhere (a machine without
    ../shared/data or SimpleITK), is read by load_prepared_scans/labels as if prepared there:
    intensities to float16 precision, geometry and label maps exactly."""
    from DeepMultimodalRegLib.image import ImageGeometry, Volume
    from DeepMultimodalRegLib.training.scan_cache import pack_cache, unpack_cache
    from DeepMultimodalRegLib.training.scans import PREPARED_FORMAT, load_prepared_labels, load_prepared_scans

    source = tmp_path / "source"
    source.mkdir()
    g = torch.Generator().manual_seed(0)
    scans = {}
    for name in ("colin27_t1", "pelvis_ct"):
        data = torch.randn(9, 10, 11, generator=g)
        spacing, origin, direction = torch.tensor([2.0, 2.0, 2.0]), torch.tensor([1.0, -2.0, 3.5]), -torch.eye(3).reshape(-1)
        torch.save({"data": data, "spacing": spacing, "origin": origin, "direction": direction},
                   source / f"{name}_2mm_v{PREPARED_FORMAT}.pt")
        scans[name] = data
    labels = torch.randint(0, 40, (9, 10, 11), generator=g, dtype=torch.int16)
    torch.save(labels, source / f"pelvis_ct_labels_2mm_v{PREPARED_FORMAT}.pt")

    archive = tmp_path / "packed" / "prepared.npz"
    assert len(pack_cache(source, archive)) == 3
    unpacked = tmp_path / "elsewhere"
    assert sorted(unpack_cache(archive, unpacked)) == sorted(p.name for p in source.glob("*.pt"))
    loaded = load_prepared_scans(tmp_path / "no_data_here", "validation", 2.0, unpacked)
    for name, data in scans.items():
        assert loaded[name].data.dtype == torch.float32
        assert torch.allclose(loaded[name].data, data, atol=4e-3)
        assert loaded[name].geometry.same_grid(ImageGeometry(shape=(9, 10, 11), spacing=(2.0,) * 3,
                                                             origin=(1.0, -2.0, 3.5),
                                                             direction=tuple((-torch.eye(3)).reshape(-1).tolist())))
    # the pelvis CT has a label-map file of the spec's naming; read back exactly, from the cache alone
    import DeepMultimodalRegLib.training.scans as scans_module
    spec = scans_module.spec_by_name("pelvis_ct")
    patched = dict(zip([s.name for s in scans_module.SCANS], scans_module.SCANS))
    patched["pelvis_ct"] = type(spec)(**{**spec.__dict__, "labels": "ct_pelvis_ts/labels.nii.gz"})
    monkeypatch.setattr(scans_module, "spec_by_name", lambda name: patched[name])
    lab = load_prepared_labels({"pelvis_ct": Volume(loaded["pelvis_ct"].data, loaded["pelvis_ct"].geometry)},
                               tmp_path / "no_data_here", unpacked)
    assert torch.equal(lab["pelvis_ct"].data, labels)
    from DeepMultimodalRegLib.errors import ImageReadError
    with pytest.raises(ImageReadError, match="no prepared-scan cache"):
        pack_cache(tmp_path / "empty_dir_that_is_missing", tmp_path / "x.npz")
