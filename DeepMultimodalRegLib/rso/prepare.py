"""Intensity preparation of the general model's inputs: CT as (HU + 1000) / 2000, MR by percentiles."""

from __future__ import annotations

from ..image.normalize import ct_window, percentile_scale
from ..image.volume import Volume

#: a scan whose darkest voxels are at or below this is taken as CT in Hounsfield units
CT_MINIMUM_HU = -900.0


def guess_modality(volume: Volume) -> str:
    """"CT" when the intensities look like Hounsfield units (air near −1000), else "MR"."""
    data = volume.data.float()
    low = float(data.min())
    return "CT" if low <= CT_MINIMUM_HU and float(data.max()) <= 5000 else "MR"


def normalise(volume: Volume, modality: str | None = None) -> Volume:
    """[0, 1] intensities: CT window [−1000, 1000] HU; MR 1st–99th percentile of non-zero voxels."""
    modality = modality or guess_modality(volume)
    if modality == "CT":
        return ct_window(volume, -1000.0, 1000.0)
    return percentile_scale(volume, 1.0, 99.0, clip=True, nonzero_only=True)
