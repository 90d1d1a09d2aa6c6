"""Preparing a volume for the DISA network: the working spacing and intensity scale it was trained on."""

from __future__ import annotations

from ..image.smoothing import discrete_gaussian
from ..image.volume import Volume

#: the spacing the network was trained at (the paper's 2 mm)
DISA_SPACING_MM = 2.0


def prepare_for_disa(volume: Volume, spacing_mm: float = DISA_SPACING_MM, modality: str | None = None) -> Volume:
    """Resample to ``spacing_mm`` isotropic (Gaussian anti-aliasing first) and z-score.

    ``modality`` "CT" clips to [-1024, 3071] HU first so padding outside the scanner's field of
    view (-2048 in some exports) does not dominate the statistics; None guesses CT from the
    intensities (a minimum at or below -1000).  The input is not modified.
    """
    import SimpleITK as sitk

    data = volume.data.float()
    if modality is None:
        modality = "CT" if float(data.min()) <= -1000 else "MR"
    if modality == "CT":
        data = data.clamp(-1024.0, 3071.0)
    source = volume.with_data(data)
    sigmas = [max(0.0, 0.5 * (spacing_mm - s)) for s in source.geometry.spacing]
    if max(sigmas) > 0:  # (an axis already coarser than the target keeps sigma 0)
        source = discrete_gaussian(source, [s * s for s in sigmas])  # ITK's filter, run in torch
    image = source.to_sitk()
    target = volume.geometry.resampled(spacing_mm)
    reference = sitk.Image(target.size_xyz, sitk.sitkFloat32)
    target.copy_to_sitk(reference)
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, float(data.min()), sitk.sitkFloat32)
    out = Volume.from_sitk(resampled, name=volume.name)
    z = out.data
    return out.with_data((z - z.mean()) / z.std().clamp_min(1e-6))
