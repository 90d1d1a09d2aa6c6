"""MS-ODE through the method catalogue: every parameterisation runs, reports NFE and saves ITK files."""

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_msode_training import phantom_anatomy, tiny_config  # noqa: E402

from DeepMultimodalRegLib.errors import InvalidParameterError
from DeepMultimodalRegLib.methods.registry import RegistrationOptions, get_method
from DeepMultimodalRegLib.msode.model import MSODE


def weights(tmp_path, kind):
    config = tiny_config(kind).model_config()
    path = tmp_path / f"{kind}.pt"
    torch.save(MSODE(config).state_dict_with_config(), path)
    return str(path)


@pytest.mark.parametrize("method", ["msode-bspline", "msode-dense", "msode-hybrid"])
def test_deformable_methods_run_and_export(tmp_path, method):
    anatomy = phantom_anatomy()
    moving = anatomy.image.with_data(torch.roll(anatomy.image.data, 1, 2), name="moved")
    extra = ({"weights_rigid": weights(tmp_path, "rigid"), "weights_deformable": weights(tmp_path, "bspline")}
             if method == "msode-hybrid" else {"weights": weights(tmp_path, method.split("-")[1])})
    result = get_method(method).runner(anatomy.image, moving, RegistrationOptions(extra=extra))
    assert result.transform.kind == "composite" and result.figures["nfe_total"] > 0
    if method == "msode-dense":  # the field was handed from 8³ to the finest 16³ grid
        assert result.transform.transforms[1].field.shape[2:] == (16, 16, 16)
    paths = result.save(tmp_path / "out", figure=False)
    itk = sitk.ReadTransform(str(paths["transform"]))
    # the untrained models (zero final layers) leave θ at its start: the centre-of-mass translation
    point = np.array(anatomy.image.geometry.center)
    ours = result.transform.transform_points(torch.tensor(point[None]))[0, 0].numpy()
    assert np.allclose(itk.TransformPoint(tuple(point)), ours, atol=1e-4)
    assert abs(ours[0] - point[0] - 10.0) < 1.0  # moving = fixed rolled by one 10 mm voxel along +x


def test_untrained_bspline_flow_file_feeds_the_hybrid_through_the_cli(tmp_path, monkeypatch):
    """``training.msode_flow`` writes a loadable B-spline model that is a pure gradient flow (every
    level's body outputs zero, unit gain); ``register --method msode-hybrid --weights FILE`` uses it for
    the deformable stage after the shipped rigid model, and a rigid file there is refused clearly."""
    from DeepMultimodalRegLib.cli.main import main as cli
    from DeepMultimodalRegLib.errors import NotAvailableError
    from DeepMultimodalRegLib.image.io import write_volume
    from DeepMultimodalRegLib.training.msode_flow import main as flow_main

    path = tmp_path / "flow.pt"
    assert flow_main([str(path), "--size", "16", "--spacing", "10", "--mesh", "4", "--rate", "5e5"]) == 0
    model = MSODE.from_state_dict(torch.load(path, weights_only=True))
    c = model.config
    assert (c.kind, c.size, c.spacing_mm, c.mesh, c.descent_rate, c.gradient_input) == ("bspline", 16, 10.0, 4, 5e5, True)
    for field in model.fields:
        assert not field.body[-1].weight.any() and float(field.log_gain.detach()) == 0.0
    anatomy = phantom_anatomy()
    moving = anatomy.image.with_data(torch.roll(anatomy.image.data, 1, 2), name="moved")
    write_volume(anatomy.image, tmp_path / "fixed.nii.gz")
    write_volume(moving, tmp_path / "moving.nii.gz")
    out = tmp_path / "out"
    assert cli(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "-o", str(out),
                "--method", "msode-hybrid", "--weights", str(path), "--device", "cpu"]) == 0
    itk = sitk.ReadTransform(str(out / "transform.h5"))  # a composite (rigid, B-spline) is written as HDF5
    assert itk.GetName() == "CompositeTransform"
    with pytest.raises(NotAvailableError, match="bspline model is needed"):
        get_method("msode-hybrid").runner(anatomy.image, moving, RegistrationOptions(extra={"weights": weights(tmp_path, "rigid")}))


def test_without_a_bspline_model_the_built_in_flow_stands_in_and_the_report_says_so():
    """No trained B-spline model ships: msode-hybrid and msode-bspline without a file run the untrained
    gradient flow that ``training.msode_flow`` writes (the same model, without touching the caller's random
    state); the report names each stage's model; msode-dense still asks for a file."""
    from DeepMultimodalRegLib.errors import NotAvailableError
    from DeepMultimodalRegLib.msode.flow import bspline_flow
    from DeepMultimodalRegLib.msode.runner import BUILT_IN_FLOW, load_model

    state = torch.random.get_rng_state()
    built_in = load_model("bspline")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert built_in.source == BUILT_IN_FLOW and all(f.body_is_silent for f in built_in.fields)
    reference = bspline_flow().state_dict_with_config()
    assert all(torch.equal(v, reference[k]) for k, v in built_in.state_dict_with_config().items())
    with pytest.raises(NotAvailableError, match="no trained MS-ODE dense model is shipped"):
        load_model("dense")
    anatomy = phantom_anatomy()
    moving = anatomy.image.with_data(torch.roll(anatomy.image.data, 1, 2), name="moved")
    result = get_method("msode-hybrid").runner(anatomy.image, moving, RegistrationOptions(device="cpu"))
    assert result.figures["rigid_model"] == "shipped msode_rigid"
    assert result.figures["deformable_model"] == BUILT_IN_FLOW
    assert result.figures["deformable_nfe"] == 14  # the paper's F(0.2)-F(0.2)-F(0.25)


def test_registration_keeps_loaded_models_until_their_file_changes(tmp_path):
    """stage_models loads a model file once per process (a Slicer session registers many pairs); a file
    written anew is loaded (and checked) afresh; load_model itself always returns a new model."""
    import os

    from DeepMultimodalRegLib.msode.runner import load_model, stage_models

    path = weights(tmp_path, "bspline")
    first = stage_models("bspline", {"weights": path})[1]
    assert stage_models("bspline", {"weights": path})[1] is first
    assert stage_models("hybrid", {})[0] is stage_models("rigid", {})[0]  # the shipped rigid model, once
    assert load_model("bspline", path) is not first
    stamp = os.stat(path)
    torch.save(MSODE(tiny_config("bspline").model_config()).state_dict_with_config(), path)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))  # a later write, whatever the clock
    again = stage_models("bspline", {"weights": path})[1]
    assert again is not first
    Path(path).write_bytes(b"not a model")
    with pytest.raises(InvalidParameterError, match="is not an MS-ODE bspline model file"):
        stage_models("bspline", {"weights": path})


def test_hybrid_reuses_the_rigid_stage_pyramid_only_where_it_equals_a_fresh_one():
    """msode-hybrid prepares the images once when both models share the working grid: the finest levels
    of the rigid model's pyramid are exactly what the deformable model would prepare itself."""
    from dataclasses import replace

    from DeepMultimodalRegLib.msode.runner import _reusable_pair, prepare_pair

    anatomy = phantom_anatomy()
    moving = anatomy.image.with_data(torch.roll(anatomy.image.data, 1, 2), name="moved")
    rigid = MSODE(tiny_config("rigid").model_config())
    c = rigid.config
    deformable = MSODE(replace(tiny_config("bspline").model_config(), size=c.size, spacing_mm=c.spacing_mm,
                               levels=c.levels - 1))
    pairs = prepare_pair(anatomy.image, moving, rigid, "cpu")
    reused, fresh = _reusable_pair(pairs, rigid, deformable), prepare_pair(anatomy.image, moving, deformable, "cpu")
    assert reused is not None and len(reused.fixed) == c.levels - 1
    for a, b in zip(reused.fixed + reused.moving, fresh.fixed + fresh.moving):
        assert torch.equal(a, b)
    assert [g.shape for g in reused.fixed_geometries] == [g.shape for g in fresh.fixed_geometries]
    assert torch.equal(reused.c_fixed, fresh.c_fixed) and torch.equal(reused.c_moving, fresh.c_moving)
    # another working grid, or more levels than the rigid stage prepared: prepared afresh
    assert _reusable_pair(pairs, rigid, MSODE(replace(deformable.config, spacing_mm=c.spacing_mm * 2))) is None
    assert _reusable_pair(pairs, rigid, MSODE(replace(deformable.config, levels=c.levels + 1))) is None


def test_hybrid_never_hands_back_a_deformation_the_similarity_likes_less_than_its_start():
    """On the co-registered Kirby21 FLAIR → T1 the untrained B-spline flow runs away at a few control points
    (its MIND-SSC distance rises); the runner then keeps the rigid stage's result: a zero B-spline and the
    start's distance, as it does for a rigid pose."""
    from conftest import shared_scan
    from DeepMultimodalRegLib.image.io import read_volume
    from DeepMultimodalRegLib.msode.grids import resample_onto

    t1, flair = (read_volume(shared_scan(f"mr_kirby21_113/{name}.nii.gz")).float() for name in ("t1_mprage", "flair"))
    t1, flair = (resample_onto(v, v.geometry.resampled(4.0)) for v in (t1, flair))
    result = get_method("msode-hybrid").runner(t1, flair, RegistrationOptions(device="cpu"))
    f = result.figures
    assert f["deformable_mind_ssd_after"] <= f["deformable_mind_ssd_before"]
    assert f.get("deformable_kept_start") is True
    assert not result.transform.transforms[-1].coefficients.any()
