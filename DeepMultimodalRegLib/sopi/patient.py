"""One patient's CT made ready for SOPI: the coarse CT, its structure mask, and their projectors.

Training and inference build the same kit from the same CT, so the networks see at registration
time exactly the DRRs and masks they were trained on: the CT averaged to ``ct_mm`` voxels, DRRs
on the model's detector (e.g. 64²), and the structure mask M (the spine from a label map, or bone
by HU when there is none) projected on a detector of the embedded features' size.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch

from ..errors import InvalidImageError
from ..image.volume import Volume
from .drr import MU_WATER_PER_MM, DRRProjector
from .geometry import CarmGeometry
from .optimize import coarsen_ct
from .rtpi import ct_branch_input

log = logging.getLogger(__name__)

#: HU above which a voxel counts as bone when no label map gives the structure
BONE_HU = 200.0
#: a mask pixel is "on" when its ray crosses at least this much structure (mm)
MASK_MIN_MM = 1.0
#: label names that make up the spine in a TotalSegmentator-style ``labels.csv``
SPINE_PREFIXES = ("vertebrae", "sacrum")


def spine_label_ids(csv_path: Path) -> list[int]:
    """Ids of the vertebrae and sacrum in a label table with columns ``structure`` and ``id``."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [int(r["id"]) for r in rows if r.get("structure", "").lower().startswith(SPINE_PREFIXES)]


def structure_mask(ct: Volume, labels: Volume | None = None, label_ids: list[int] | None = None) -> Volume:
    """The structure M as a 0/1 float volume on the CT's grid.

    ``labels`` (same grid as the CT): the voxels with one of ``label_ids`` (all non-zero labels when
    None); without a label map, bone (HU > 200) — the paper uses the spine, which is bone.
    """
    if labels is None:
        return ct.with_data((ct.data.float() > BONE_HU).float(), name=f"{ct.name} bone")
    if not labels.geometry.same_grid(ct.geometry, tolerance_mm=0.01):
        raise InvalidImageError(f"the label map '{labels.name}' is not on the CT's grid (shape {labels.shape} vs "
                                f"{ct.shape}); it must be the CT's own segmentation")
    data = labels.data.round().long()
    mask = (data != 0) if not label_ids else torch.isin(data, torch.as_tensor(label_ids, dtype=torch.long))
    if not bool(mask.any()):
        raise InvalidImageError(f"the label map '{labels.name}' has none of the structure labels "
                                f"{label_ids or '≠ 0'}")
    return ct.with_data(mask.float(), name=f"{ct.name} structure")


class PatientKit:
    """Projectors of one (coarse) CT for the model's detector; ``render``/``mask_render`` take poses [B, 6]."""

    def __init__(self, ct_coarse: Volume, mask_coarse: Volume, geometry: CarmGeometry, mask_size: int,
                 ct_cube_size: int, with_bone: bool = False, device="cpu") -> None:
        self.ct, self.mask, self.geometry = ct_coarse, mask_coarse, geometry
        step = min(ct_coarse.geometry.spacing)  # one sample per (smallest) voxel, as the optimisers' levels
        self.projector = DRRProjector(ct_coarse, geometry, device=device, step_mm=step)
        self.mask_projector = DRRProjector(mask_coarse, geometry.resized(mask_size), device=device, step_mm=step,
                                           attenuation=mask_coarse.data.float())
        # bone's extra attenuation, for training X-rays with a harder spectrum than the projector's
        self.bone_projector = DRRProjector(
            ct_coarse, geometry, device=device, step_mm=step,
            attenuation=MU_WATER_PER_MM * (ct_coarse.data.float() - BONE_HU).clamp_min(0.0) / 1000.0,
        ) if with_bone else None
        self.ct_cube = ct_branch_input(ct_coarse, ct_cube_size)

    @classmethod
    def build(cls, ct: Volume, mask: Volume, geometry: CarmGeometry, ct_mm: float, mask_size: int,
              ct_cube_size: int, with_bone: bool = False) -> "PatientKit":
        """From the full-resolution CT and mask (same grid): both averaged to ``ct_mm``."""
        return cls(coarsen_ct(ct.float(), ct_mm), coarsen_ct(mask.float(), ct_mm), geometry, mask_size, ct_cube_size,
                   with_bone)

    def render(self, poses: torch.Tensor) -> torch.Tensor:
        return self.projector.render(poses)

    def mask_render(self, poses: torch.Tensor) -> torch.Tensor:
        """M' = P(θ; M) on the mask detector: 1 where the ray crosses ≥ 1 mm of structure."""
        with torch.no_grad():
            return (self.mask_projector.render(poses) > MASK_MIN_MM).float()
