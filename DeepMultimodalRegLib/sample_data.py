"""The small sample volumes shipped with the product (Resources/SampleData, licences in LICENSES.md)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import ImageReadError

SAMPLES = {
    "mr_brain_t1": "mr_brain_t1.nii.gz",
    "mr_brain_t2": "mr_brain_t2.nii.gz",
    "mr_brain_flair": "mr_brain_flair.nii.gz",
    "ct_chest": "ct_chest.nii.gz",
    "ct_chest_labels": "ct_chest_labels.nii.gz",
    "ct_pelvis": "ct_pelvis.nii.gz",
}


def sample_data_dir() -> Path:
    """Where the sample volumes are: $DEEPMMREG_SAMPLE_DATA, the source tree / Slicer module
    install (Resources/SampleData next to the package), or the wheel's shared data folder."""
    here = Path(__file__).resolve().parent
    candidates = [os.environ.get("DEEPMMREG_SAMPLE_DATA"),
                  here.parent / "Resources" / "SampleData",
                  here / "Resources" / "SampleData",
                  Path(sys.prefix) / "share" / "deepmultimodalreg" / "SampleData"]
    for c in candidates:
        if c and (Path(c) / SAMPLES["mr_brain_t1"]).exists():
            return Path(c)
    raise ImageReadError("the sample data folder was not found; set DEEPMMREG_SAMPLE_DATA to the "
                         "Resources/SampleData folder of the DeepMultimodalReg source")


def sample_path(name: str) -> Path:
    if name not in SAMPLES:
        raise ImageReadError(f"unknown sample {name!r}; choose one of {', '.join(SAMPLES)}")
    return sample_data_dir() / SAMPLES[name]


def load_sample(name: str):
    """Read one sample volume by name (see :data:`SAMPLES`)."""
    from .image.io import read_volume

    return read_volume(sample_path(name), name=name)
