"""Shared fixtures: the embedded sample volumes and the real scans of ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "Resources" / "SampleData"
SHARED_DATA = Path(os.environ.get("DEEPMMREG_SHARED_DATA", REPO.parent / "shared" / "data"))


def require_shared_data() -> Path:
    """The shared data folder, for tests whose library calls find it by themselves (training recipes
    read every scan of ../shared/data); skips with the reason if this checkout has none."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the shared data folder {SHARED_DATA} is absent (set DEEPMMREG_SHARED_DATA)")
    return SHARED_DATA


def shared_scan(relative: str) -> Path:
    """A real scan from ../shared/data (skips with the reason if this checkout has none)."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real scan {relative} not found under {SHARED_DATA} (set DEEPMMREG_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def pelvis_ct():
    """The real abdomen-pelvis CT (3 mm, 122×101×112, HU), as a float volume."""
    from DeepMultimodalRegLib.image import read_volume

    return read_volume(shared_scan("ct_pelvis_ts/ct.nii.gz")).float()


@pytest.fixture(scope="session")
def brain_t1_real_crop():
    """A 64×80×80 crop of the real Kirby21 T1 (1.2×1×1 mm, oblique-free but x-flipped direction)."""
    import SimpleITK as sitk

    from DeepMultimodalRegLib.image import Volume

    image = sitk.ReadImage(str(shared_scan("mr_kirby21_113/t1_mprage.nii.gz")))
    crop = image[50:114, 90:170, 90:170]
    return Volume.from_sitk(sitk.Cast(crop, sitk.sitkFloat32), name="kirby21_t1_crop")


@pytest.fixture(scope="session")
def sample_t1():
    from DeepMultimodalRegLib.sample_data import load_sample

    return load_sample("mr_brain_t1")


@pytest.fixture(scope="session")
def sample_t2():
    from DeepMultimodalRegLib.sample_data import load_sample

    return load_sample("mr_brain_t2")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module of small tensors: on a small shared CPU, two OpenMP threads
    spin against other jobs and run up to 10x slower (measured while building RSO and SOPI)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
