"""Training slices for the translation model of MS-ODE's similarity: two contrasts of one anatomy.

The anatomies and contrasts are MS-ODE's own (:mod:`.msode_data`): the voxelmorph T1 (46 labels)
and the MNI152 2009a T1 (labels from its GM/WM maps), on a 3 mm LPS-aligned grid.  Kirby21 (the
only subject with real T1/T2/FLAIR) is held out, as for MS-ODE: the benchmark and the content
encoder's test read it.  Contrast groups (the one-hot code): ``t1`` = the real scan with a random
gamma (so the group has a style to encode), ``synthetic`` = label-driven synthesis
(``draw_contrast``: random intensity per label, bias field, noise).

A sample is a stack of adjacent slices (channels) along a random axis, cropped in-plane around
the brain with a random offset, rotated in-plane by a random angle and maybe mirrored — the same
geometry for both contrasts, so the pair stays co-registered (which only the optional paired
content term uses; the paper's losses do not need it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .msode_data import Anatomy, draw_contrast


@dataclass
class SliceSampling:
    crop: int = 64
    slices: int = 5
    #: in-plane rotations U(±this) degrees (registration shows the encoder rotated images too)
    rotation_deg: float = 90.0
    #: random offset of the crop centre from the brain's centre, voxels per axis
    jitter: int = 6
    gamma_range: tuple = (0.7, 1.4)


@dataclass
class SlicePairs:
    a: torch.Tensor  # [B, slices, crop, crop] in [0, 1]
    b: torch.Tensor
    code_a: torch.Tensor  # [B] contrast group of a
    code_b: torch.Tensor


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(1, generator=generator))


def contrast_of(anatomy: Anatomy, code: int, generator: torch.Generator, sampling: SliceSampling) -> torch.Tensor:
    """A whole-volume image of ``anatomy`` in contrast group ``code`` (0: real T1, else synthetic)."""
    if code == 0:
        gamma = _uniform(generator, *sampling.gamma_range)
        return anatomy.image.data.float().clamp(0, 1) ** gamma
    return draw_contrast(anatomy, generator, real_t1_probability=0.0)


def _slice_index(mask: torch.Tensor, half: int, generator: torch.Generator) -> int:
    """A slice along axis 0 drawn ∝ its brain area (so empty slices are rare), away from the ends."""
    area = mask.float().sum(dim=(1, 2))
    area[:half] = 0
    area[area.numel() - half:] = 0
    return int(torch.multinomial(area + 1e-6, 1, generator=generator))


def _crop_grid(centre_yx: torch.Tensor, size: tuple[int, int], sampling: SliceSampling,
               generator: torch.Generator) -> torch.Tensor:
    """grid_sample coordinates [1, crop, crop, 2] of a rotated (maybe mirrored) crop about ``centre_yx``."""
    h, w = size
    angle = math.radians(_uniform(generator, -sampling.rotation_deg, sampling.rotation_deg))
    mirror = -1.0 if float(torch.rand(1, generator=generator)) < 0.5 else 1.0
    r = torch.arange(sampling.crop, dtype=torch.float32) - (sampling.crop - 1) / 2
    v, u = torch.meshgrid(r, r, indexing="ij")  # rows, columns of the crop, voxels from its centre
    u = u * mirror
    cos, sin = math.cos(angle), math.sin(angle)
    x = centre_yx[1] + cos * u - sin * v
    y = centre_yx[0] + sin * u + cos * v
    # align_corners=True: −1 and 1 are the centres of the first and last voxels
    return torch.stack([2 * x / (w - 1) - 1, 2 * y / (h - 1) - 1], -1)[None]


def sample_pairs(anatomies: list[Anatomy], batch: int, groups: int, sampling: SliceSampling,
                 generator: torch.Generator) -> SlicePairs:
    """``batch`` co-registered slice stacks in two different contrast groups."""
    half = sampling.slices // 2
    out_a, out_b, codes_a, codes_b = [], [], [], []
    for _ in range(batch):
        anatomy = anatomies[int(torch.randint(len(anatomies), (1,), generator=generator))]
        code_a = int(torch.randint(groups, (1,), generator=generator))
        code_b = (code_a + int(torch.randint(1, groups, (1,), generator=generator))) % groups
        axis = int(torch.randint(3, (1,), generator=generator))
        mask = anatomy.mask.movedim(axis, 0)
        index = _slice_index(mask, half, generator)
        plane = mask[index].float()
        yy, xx = torch.nonzero(plane, as_tuple=True)
        centre = torch.stack([yy.float().mean(), xx.float().mean()]) if yy.numel() else \
            torch.tensor([(plane.shape[0] - 1) / 2, (plane.shape[1] - 1) / 2])
        centre = centre + torch.randint(-sampling.jitter, sampling.jitter + 1, (2,), generator=generator).float()
        grid = _crop_grid(centre, tuple(plane.shape), sampling, generator)
        for code, out in ((code_a, out_a), (code_b, out_b)):
            volume = contrast_of(anatomy, code, generator, sampling).movedim(axis, 0)
            stack = volume[index - half:index + half + 1][None]
            out.append(F.grid_sample(stack, grid, align_corners=True, padding_mode="zeros")[0])
        codes_a.append(code_a)
        codes_b.append(code_b)
    return SlicePairs(torch.stack(out_a), torch.stack(out_b), torch.tensor(codes_a), torch.tensor(codes_b))
