"""MS-ODE training: a tiny run lowers every loss term; weights round-trip with weights_only; bad inputs fail early."""

import numpy as np
import pytest
import torch

from DeepMultimodalRegLib.errors import DeepMMRegError, InvalidImageError, InvalidParameterError, NotAvailableError
from DeepMultimodalRegLib.image.geometry import ImageGeometry
from DeepMultimodalRegLib.image.volume import Volume
from DeepMultimodalRegLib.methods.registry import RegistrationOptions, get_method
from DeepMultimodalRegLib.msode.grids import working_grid
from DeepMultimodalRegLib.msode.model import MSODE, MSODEConfig
from DeepMultimodalRegLib.msode.solvers import parse_solvers
from DeepMultimodalRegLib.training.msode_data import Anatomy, make_batch
from DeepMultimodalRegLib.training.msode_train import MSODETrainingConfig, loss_terms, train_msode
from conftest import require_shared_data  # the Testing folder is on the path


def phantom_anatomy(size=16, spacing=10.0, seed=0) -> Anatomy:
    """Nested, off-centre ellipsoids with labels: a small 'head' whose contrasts can be synthesised."""
    grid = working_grid(ImageGeometry(shape=(size, size, size), spacing=(spacing,) * 3), size, spacing)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij")
    labels = np.zeros((size,) * 3, np.int64)
    labels[(x / 0.8) ** 2 + (y / 0.7) ** 2 + (z / 0.6) ** 2 < 1] = 1
    labels[((x - 0.2) / 0.35) ** 2 + ((y + 0.1) / 0.3) ** 2 + (z / 0.4) ** 2 < 1] = 2
    labels[((x + 0.3) / 0.2) ** 2 + ((y - 0.3) / 0.25) ** 2 + ((z - 0.2) / 0.2) ** 2 < 1] = 3
    intensity = np.array([0.0, 0.5, 1.0, 0.2])[labels] * (labels > 0)
    image = Volume(torch.tensor(intensity, dtype=torch.float32), grid, "phantom")
    return Anatomy("phantom", image, image.with_data(torch.from_numpy(labels)), torch.from_numpy(labels > 0))


def tiny_config(kind):
    return MSODETrainingConfig(kind=kind, batch=2, size=16, spacing_mm=10.0, levels=2, width=8, mesh=2,
                               training_solvers="F(0.5)-F(0.5)", inference_solvers="F(0.5)-F(0.5)",
                               learning_rate=1e-3, rotation_deg=10.0, translation_mm=8.0, bspline_sigma_mm=6.0,
                               self_scale_mm=5.0, lambda_reg=20.0, inputs="image")


@pytest.mark.parametrize("kind", ["rigid", "bspline"])
def test_tiny_training_lowers_every_loss_term(kind):
    torch.manual_seed(0)
    config = tiny_config(kind)
    anatomy = phantom_anatomy()
    batch = make_batch([anatomy], kind, 2, config.levels, config.motion(), torch.Generator().manual_seed(1),
                       real_t1_probability=0.0)
    model = MSODE(config.model_config())
    if kind == "bspline":  # start from a rough field so that the smoothness term has something to lower
        for field in model.fields:
            torch.nn.init.normal_(field.body[-1].weight, std=0.05)
    solvers = parse_solvers(config.training_solvers)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    with torch.no_grad():
        before = {k: float(v) for k, v in loss_terms(model, batch, config, solvers).items()}
    for _ in range(15):
        optimiser.zero_grad()
        loss_terms(model, batch, config, solvers)["total"].backward()
        optimiser.step()
    with torch.no_grad():
        after = {k: float(v) for k, v in loss_terms(model, batch, config, solvers).items()}
    terms = ["sim", "self"] + (["reg"] if kind == "bspline" else [])
    for term in terms:
        assert after[term] < before[term], (term, before, after)
    assert after["rmse_mm"] < before["rmse_mm"]


def test_default_learning_rate_moves_the_registration_gently():
    """One Adam step of the default recipe, from the zero-started head, must not jolt θ(T).

    Adam moves every weight by about the learning rate, whatever the gradient's size, so a
    too-large default turns into a fixed-size jump of the learned rates on every step; at the old
    default (1e-3) the first step moved θ(T) by 2.4° and 0.8 mm per component (all six alike), and
    on fresh random pairs those jumps made validation RMSE(φ) rise above identity's instead of fall.
    The overfitting test above cannot see it: one batch is learnable at any such rate."""
    torch.manual_seed(0)
    config = MSODETrainingConfig(size=32, spacing_mm=8.0)  # default recipe, small grid (the head does not see its size)
    batch = make_batch([phantom_anatomy(32, 8.0)], "rigid", config.batch, config.levels, config.motion(),
                       torch.Generator().manual_seed(1), real_t1_probability=0.0)
    model = MSODE(config.model_config())
    solvers = parse_solvers(config.training_solvers)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    loss_terms(model, batch, config, solvers)["total"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.gradient_clip)
    optimiser.step()
    with torch.no_grad():
        theta, _, _ = model.solve(batch.pairs, solvers=solvers)
    assert np.degrees(float(theta[:, :3].abs().max())) < 1.0
    assert float(theta[:, 3:].abs().max()) < 0.5


def test_training_recipe_checkpoints_resumes_and_weights_load_weights_only(tmp_path):
    config = tiny_config("rigid")
    config.steps, config.checkpoint_every, config.validation_every, config.validation_batches = 2, 1, 2, 1
    summary = train_msode(tmp_path, config, anatomies=[phantom_anatomy()])
    assert summary["steps"] == 2 and summary["finished"]
    config.steps = 3
    summary = train_msode(tmp_path, config, anatomies=[phantom_anatomy()])
    assert summary["steps"] == 3  # resumed from the checkpoint, one more step
    state = torch.load(tmp_path / "msode_rigid.pt", weights_only=True)
    model = MSODE.from_state_dict(state)
    assert model.config.kind == "rigid" and model.config.size == 16
    assert [str(s) for s in model.config.solver_specs()] == ["F(0.5)", "F(0.5)"]


def test_bad_settings_and_inputs_fail_early(tmp_path):
    with pytest.raises(InvalidParameterError):
        MSODEConfig(kind="affine")
    with pytest.raises(InvalidParameterError):
        MSODEConfig(kind="rigid", levels=3, solvers="F(0.1)-F(0.1)").solver_specs()
    with pytest.raises(InvalidParameterError):
        MSODE.from_state_dict({"weight": torch.zeros(1)})
    anatomy = phantom_anatomy()
    weights = tmp_path / "rigid.pt"
    torch.save(MSODE(tiny_config("rigid").model_config()).state_dict_with_config(), weights)
    info = get_method("msode-rigid")
    flat = Volume(torch.zeros(1, 16, 16), ImageGeometry(shape=(1, 16, 16)), "xray")
    with pytest.raises(InvalidImageError, match="2D"):
        info.runner(flat, anatomy.image, RegistrationOptions(extra={"weights": str(weights)}))
    nan = anatomy.image.with_data(anatomy.image.data.clone())
    nan.data[3, 3, 3] = float("nan")
    with pytest.raises(InvalidImageError, match="NaN"):
        info.runner(anatomy.image, nan, RegistrationOptions(extra={"weights": str(weights)}))
    # a model of the wrong kind is refused before any work
    with pytest.raises(NotAvailableError, match="rigid model"):
        get_method("msode-bspline").runner(anatomy.image, anatomy.image, RegistrationOptions(extra={"weights": str(weights)}))


def test_runner_returns_result_with_nfe_and_honours_cancel(tmp_path):
    from DeepMultimodalRegLib.progress import CancelToken

    anatomy = phantom_anatomy()
    weights = tmp_path / "rigid.pt"
    torch.save(MSODE(tiny_config("rigid").model_config()).state_dict_with_config(), weights)
    result = get_method("msode-rigid").runner(anatomy.image, anatomy.image,
                                              RegistrationOptions(extra={"weights": str(weights)}))
    assert result.figures["nfe"] == 6 and result.figures["nfe_per_level"] == [3, 3]  # F(0.5) on two segments of 1.5
    assert result.transform.kind == "rigid" and result.warped.shape == anatomy.image.shape
    token = CancelToken()
    token.cancel()
    with pytest.raises(DeepMMRegError, match="cancelled"):
        get_method("msode-rigid").runner(anatomy.image, anatomy.image,
                                         RegistrationOptions(cancel=token, extra={"weights": str(weights)}))


def test_similarity_prefers_the_aligned_pair_across_contrasts():
    from DeepMultimodalRegLib.msode.similarity import similarity_loss
    from DeepMultimodalRegLib.training.msode_data import draw_contrast

    anatomy = phantom_anatomy(size=32, spacing=6.0)
    g = torch.Generator().manual_seed(5)
    a = draw_contrast(anatomy, g, 0.0)[None, None]
    b = draw_contrast(anatomy, g, 0.0)[None, None]
    aligned = float(similarity_loss(a, b, "mind"))
    shifted = float(similarity_loss(torch.roll(a, 3, 4), b, "mind"))
    assert aligned < shifted
    # the DISA alternative runs and is differentiable (its shipped weights, trained at 2 mm, do not
    # separate these 6 mm phantom pairs: it is offered, not used by the shipped models)
    x = a.clone().requires_grad_(True)
    similarity_loss(x, b, "disa").backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    with pytest.raises(InvalidParameterError):
        similarity_loss(a, b, "mutual-information")


def test_voxelmorph_scan_lands_in_the_same_head_orientation_as_mni152():
    """The voxelmorph npz has no geometry; read as plain (z, y, x) its sagittal planes became axial
    ones.  Oracle: the MNI152 template (a NIfTI with a real header).  On a shared LPS grid about
    each scan's centre, the correctly oriented voxelmorph T1 must resemble MNI152 far more than the
    same array read with an identity geometry."""
    from conftest import shared_scan

    from DeepMultimodalRegLib.image.io import read_volume
    from DeepMultimodalRegLib.msode.grids import resample_onto
    from DeepMultimodalRegLib.training.scans import read_voxelmorph_npz

    t1, seg = read_voxelmorph_npz(shared_scan("mr_t1_seg_vxm/t1_seg.npz"))
    assert t1.data.shape == seg.data.shape
    mni = read_volume(shared_scan("mni152_2009a/t1.nii.gz")).float()
    raw = Volume(t1.data.permute(2, 1, 0).contiguous(), ImageGeometry(shape=tuple(t1.data.shape[::-1])))

    def on_grid(volume):  # a 100 mm cube about the brain's centre of mass: no background
        index = (volume.data > 0.1 * volume.data.max()).nonzero().double().mean(0).flip(0).numpy()
        centre = (volume.geometry.index_to_physical_matrix() @ np.append(index, 1.0))[:3]
        grid = ImageGeometry(shape=(25, 25, 25), spacing=(4.0,) * 3, origin=tuple(centre - 48.0))
        data = resample_onto(volume, grid).data.double()
        return (data - data.mean()) / data.std()

    reference = on_grid(mni)
    oriented, unoriented = on_grid(t1), on_grid(raw)
    correlation = float((oriented * reference).mean())
    # measured: 0.72 here; the best of all 48 axis permutations and flips but its own mirror
    # image (a brain is nearly symmetric; the labels below settle left and right); next best 0.29
    assert correlation > 0.6
    assert correlation > float((unoriented * reference).mean()) + 0.3
    # anatomical sense in LPS: left white matter (label 2) at larger x than right (41)
    to_physical = seg.geometry.index_to_physical_matrix()
    x = {}
    for label in (2, 41):
        k, j, i = (seg.data == label).nonzero().double().mean(0).tolist()
        x[label] = (to_physical @ np.array([i, j, k, 1.0]))[0]
    assert x[2] > x[41] + 20.0


def test_model_card_reports_each_range_separately_and_the_training_history(tmp_path):
    """The card's benchmark lines keep ±25° and ±75° apart (pooled, a model that works at one range
    and fails at the other would read as half-working), with medians as NumPy computes them."""
    import json as _json

    import numpy as np

    from DeepMultimodalRegLib.training.msode_publish import msode_model_card, summarise_benchmark

    records = []
    for deg, errors in ((25.0, [1.0, 3.0, 1.5]), (75.0, [40.0, 1.8, 30.0])):
        for k, e in enumerate(errors):
            records.append({"motion": "rigid", "range_deg": deg, "method": "msode-rigid", "case": k,
                            "initial_rmse_mm": 20.0 + k, "rmse_mm": e, "seconds": 1.0 + k})
    path = tmp_path / "bench.json"
    path.write_text(_json.dumps({"records": records}), encoding="utf-8")
    lines = summarise_benchmark(path)
    assert set(lines) == {"rigid ±25°, msode-rigid", "rigid ±75°, msode-rigid"}
    assert "success (RMSE(φ) < 2 mm) 67%" in lines["rigid ±25°, msode-rigid"]
    assert f"{np.median([40.0, 1.8, 30.0]):.1f} mm" in lines["rigid ±75°, msode-rigid"]
    assert "success (RMSE(φ) < 2 mm) 33%" in lines["rigid ±75°, msode-rigid"]

    validation = {"rmse_mm": 30.0, "sim": 0.05, "self": 9.0, "reg": 0.0}
    summary = {"kind": "rigid", "parameters": 1234, "steps": 10, "seconds": 600.0, "threads": 1, "finished": False,
               "anatomies": ["voxelmorph_t1"], "initial_validation": validation,
               "final_validation": {**validation, "rmse_mm": 12.0},
               "config": {"size": 32, "spacing_mm": 8.0, "levels": 3, "total_time": 3.0, "inputs": "image+mind",
                          "training_solvers": "F(1)", "inference_solvers": "", "real_t1_probability": 0.25,
                          "rotation_deg": 75.0, "translation_mm": 20.0, "bspline_sigma_mm": 8.0,
                          "similarity": "mind", "lambda_self": 1.0, "self_scale_mm": 10.0, "lambda_reg": None,
                          "learning_rate": 1e-4, "batch": 2, "gradient_clip": 1.0, "seed": 0,
                          "validation_batches": 4}}
    card = msode_model_card(summary, lines, "Resumed from a ±25° run.")
    assert "## Training history\n\nResumed from a ±25° run." in card
    assert "30.00 → 12.00 mm" in card and "(10 min in all)" in card
    assert card.index("## Training history") < card.index("## Benchmark")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_training_runs_on_the_chosen_device_and_saves_cpu_weights(tmp_path, device):
    config = tiny_config("bspline")
    config.steps, config.checkpoint_every, config.validation_every, config.validation_batches = 1, 1, 1, 1
    config.device = device
    summary = train_msode(tmp_path, config, anatomies=[phantom_anatomy()])
    assert summary["device"].startswith(device) and summary["steps"] == 1
    state = torch.load(tmp_path / "msode_bspline.pt", weights_only=True)
    assert all(v.device.type == "cpu" for v in state.values())
    assert MSODE.from_state_dict(state).config.kind == "bspline"


def test_cli_flags_reach_the_training_config():
    """`train msode` flags land in the recipe's config (what a model card's command line relies on)."""
    from DeepMultimodalRegLib.cli.main import build_parser
    from DeepMultimodalRegLib.training.msode_cli import config_from_args

    args = build_parser().parse_args(["train", "msode", "-o", "x", "--kind", "bspline", "--grid-size", "32",
                                      "--grid-spacing", "8", "--learning-rate", "1e-4", "--motion-deg", "40",
                                      "--device", "cpu"])
    config = config_from_args(args)
    assert (config.kind, config.size, config.spacing_mm, config.learning_rate, config.rotation_deg, config.device) == \
        ("bspline", 32, 8.0, 1e-4, 40.0, "cpu")
    default = config_from_args(build_parser().parse_args(["train", "msode", "-o", "x"]))
    assert (default.size, default.spacing_mm, default.device) == (48, 5.0, "auto")


def test_a_resumed_run_uses_the_learning_rate_it_is_given(tmp_path):
    """Resuming with a lower rate (to let a run settle) must not silently keep the checkpoint's rate."""
    config = tiny_config("rigid")
    config.steps, config.checkpoint_every, config.validation_every, config.validation_batches = 1, 1, 1, 1
    train_msode(tmp_path, config, anatomies=[phantom_anatomy()])
    config.steps, config.learning_rate = 2, 1e-5
    train_msode(tmp_path, config, anatomies=[phantom_anatomy()])
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert [g["lr"] for g in saved["optimiser"]["param_groups"]] == [1e-5]


def test_training_anatomies_include_a_whole_head_upright_like_mni152():
    """Colin27 (skull, scalp) joins the brain-only anatomies; on a shared LPS grid its head lies the
    way MNI152's does (both are NIfTI with real headers, so this guards the reader, not the data)."""
    from DeepMultimodalRegLib.msode.grids import resample_onto
    from DeepMultimodalRegLib.training.msode_data import raw_anatomies

    require_shared_data()
    anatomies = {name: (image, labels) for name, image, labels in raw_anatomies()}
    assert {"voxelmorph_t1", "mni152_t1", "colin27_t1"} <= set(anatomies)
    colin, aal = anatomies["colin27_t1"]
    assert aal.geometry.same_grid(colin.geometry) and int(aal.data.max()) == 116
    head = (colin.data > colin.data.mean()).float().mean()
    brain = (aal.data > 0).float().mean()
    assert head > 1.3 * brain  # skull and scalp beyond the labelled brain
    grid = ImageGeometry(shape=(24, 24, 24), spacing=(8.0,) * 3, origin=(-92.0, -120.0, -76.0))
    a = resample_onto(anatomies["mni152_t1"][0], grid).data.double().reshape(-1)
    b = resample_onto(colin, grid).data.double().reshape(-1)
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.5


def test_prepared_anatomies_are_cached_and_travel_packed(tmp_path):
    """The recipe's anatomies are prepared once into the run folder; a second run (or a machine
    without the data and SimpleITK, after scan_cache pack/unpack) reads them from there: images to
    float16 precision, labels, masks and grids exactly."""
    from DeepMultimodalRegLib.training.msode_data import ANATOMY_NAMES, load_prepared_anatomies
    from DeepMultimodalRegLib.training.scan_cache import pack_cache, unpack_cache

    require_shared_data()
    cache = tmp_path / "run" / "prepared_anatomies"
    first = load_prepared_anatomies(None, 16, 16.0, cache)
    assert [a.name for a in first] == list(ANATOMY_NAMES) and len(list(cache.glob("*.pt"))) == 3
    pack_cache(cache, tmp_path / "packed.npz")
    unpack_cache(tmp_path / "packed.npz", tmp_path / "there")
    for folder, tolerance in ((cache, 0.0), (tmp_path / "there", 1e-3)):
        again = load_prepared_anatomies(tmp_path / "no_data_here", 16, 16.0, folder)
        for a, b in zip(first, again):
            assert a.name == b.name and b.image.geometry.same_grid(a.image.geometry)
            assert torch.allclose(a.image.data, b.image.data, atol=tolerance)
            assert torch.equal(a.labels.data, b.labels.data) and torch.equal(a.mask, b.mask)
    with pytest.raises(DeepMMRegError):  # another grid is not in the cache: it needs the data
        load_prepared_anatomies(tmp_path / "no_data_here", 8, 16.0, cache)
