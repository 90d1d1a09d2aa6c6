"""Preparing a volume for the DISA network: the working spacing and intensity scale it was trained on."""

from __future__ import annotations

import torch

from ..image.smoothing import antialias_for_spacing
from ..image.volume import Volume

#: the spacing the network was trained at (the paper's 2 mm)
DISA_SPACING_MM = 2.0


def _clipped(volume: Volume, modality: str | None) -> torch.Tensor:
    """float32 intensities; a CT ("CT", or None with a minimum at or below -1000) clipped to [-1024, 3071] HU."""
    data = volume.data.float()
    if modality is None:
        modality = "CT" if float(data.min()) <= -1000 else "MR"
    return data.clamp(-1024.0, 3071.0) if modality == "CT" else data


def smooth_for_disa(volume: Volume, spacing_mm: float = DISA_SPACING_MM, modality: str | None = None) -> Volume:
    """The part of :func:`prepare_for_disa` done on the volume's own grid: CT clipped, then anti-aliased for
    ``spacing_mm``.  Resampled onto any ``spacing_mm`` grid (through a rigid pose, say) and passed to
    :func:`prepare_for_disa`, it is described as if prepared from the full-resolution volume, without
    resampling the full-resolution volume again for every pose: the orientation bank and the resampled
    polish of DISA registration work this way (on a 2 mm input, the very same values)."""
    return antialias_for_spacing(volume.with_data(_clipped(volume, modality)), spacing_mm)


def prepare_for_disa(volume: Volume, spacing_mm: float = DISA_SPACING_MM, modality: str | None = None) -> Volume:
    """Resample to ``spacing_mm`` isotropic (Gaussian anti-aliasing first) and z-score.

    ``modality`` "CT" clips to [-1024, 3071] HU first so padding outside the scanner's field of
    view (-2048 in some exports) does not dominate the statistics; None guesses CT from the
    intensities (a minimum at or below -1000).  The input is not modified.
    """
    import SimpleITK as sitk

    data = _clipped(volume, modality)
    image = antialias_for_spacing(volume.with_data(data), spacing_mm).to_sitk()  # ITK's filter, in torch
    target = volume.geometry.resampled(spacing_mm)
    reference = sitk.Image(target.size_xyz, sitk.sitkFloat32)
    target.copy_to_sitk(reference)
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, float(data.min()), sitk.sitkFloat32)
    out = Volume.from_sitk(resampled, name=volume.name)
    z = out.data
    return out.with_data((z - z.mean()) / z.std().clamp_min(1e-6))
