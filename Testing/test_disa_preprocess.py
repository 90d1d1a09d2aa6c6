"""DISA's preparation: anti-aliasing before a pose (smooth_for_disa) against preparing the resampled scan."""

from __future__ import annotations

import math

import torch

from conftest import shared_scan
from DeepMultimodalRegLib.disa.preprocess import prepare_for_disa, smooth_for_disa
from DeepMultimodalRegLib.image import read_volume
from DeepMultimodalRegLib.transforms.linear import RigidTransform
from DeepMultimodalRegLib.transforms.resample import warp_volume


def _turn(volume):
    centre = torch.tensor(volume.geometry.center, dtype=torch.float64)
    angles = [math.radians(a) for a in (20.0, -10.0, 15.0)]
    return RigidTransform(torch.tensor([[*angles, 5.0, -3.0, 2.0]], dtype=torch.float64), centre)


def test_on_a_2mm_scan_smoothing_changes_nothing_but_the_ct_clip(pelvis_ct):
    flair = read_volume(shared_scan("mr_kirby21_113/flair.nii.gz")).float()
    at_2mm = warp_volume(flair, RigidTransform.identity(), flair.geometry.resampled(2.0))
    assert torch.equal(smooth_for_disa(at_2mm).data, at_2mm.data)
    ct_2mm = warp_volume(pelvis_ct, RigidTransform.identity(), pelvis_ct.geometry.resampled(2.0),
                         default_value=-2048.0)  # padding below the clip, as some exports have
    assert torch.equal(smooth_for_disa(ct_2mm).data, ct_2mm.data.clamp(-1024.0, 3071.0))
    # so the registration's bank and polish, which resample the smoothed scan onto the 2 mm grid, see on a
    # 2 mm input exactly what they saw when they resampled the scan itself
    pose = _turn(at_2mm)
    direct = prepare_for_disa(warp_volume(at_2mm, pose, at_2mm.geometry, default_value=float(at_2mm.data.min())))
    smoothed = prepare_for_disa(warp_volume(smooth_for_disa(at_2mm), pose, at_2mm.geometry.resampled(2.0),
                                            default_value=float(at_2mm.data.min())))
    assert torch.equal(direct.data, smoothed.data)


def test_at_full_resolution_smoothing_first_describes_the_same_image():
    """A full-resolution scan (1.2 × 1 × 1 mm) turned by a pose: smoothed first and resampled straight onto the
    2 mm grid, or resampled at full resolution and then prepared, the network sees nearly the same image."""
    flair = read_volume(shared_scan("mr_kirby21_113/flair.nii.gz")).float()
    pose, background = _turn(flair), float(flair.data.min())
    full = prepare_for_disa(warp_volume(flair, pose, flair.geometry, default_value=background))
    smoothed = prepare_for_disa(warp_volume(smooth_for_disa(flair), pose, flair.geometry.resampled(2.0),
                                            default_value=background))
    assert full.geometry.same_grid(smoothed.geometry)
    difference = (full.data - smoothed.data).abs()
    assert float(difference.mean()) < 0.02  # z-scored units
    assert float(torch.corrcoef(torch.stack([full.data.flatten(), smoothed.data.flatten()]))[0, 1]) > 0.999
