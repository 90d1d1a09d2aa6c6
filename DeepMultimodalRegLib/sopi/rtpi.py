"""RTPI: the pose-initialisation network of SOPI (Chen et al. 2023, section 2.2, Fig. 2).

An **asymmetric dual branch**: a small 3D convolutional branch reads the CT (attenuation, in the
nominal AP orientation, on a coarse cube) and folds its beam axis into the channels, which gives
2D feature maps aligned with the detector; a 2D branch reads the X-ray.  The two sets of maps,
of the same size, are concatenated along the channels (so neither input's information swamps the
other's — the paper's "information balance"), go through a **localisation network of residual
blocks**, and **one regression head per pose parameter** (the paper's parameter-specific
regression) gives rx, ry, rz, tx, ty, tz.  Heads predict in units of the training distribution's
standard deviations, so all six outputs are of order one.

Sized for a CPU: a 64² X-ray and a 32³ CT cube (~4 mm for a chest CT).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..image.volume import Volume
from .drr import hu_to_attenuation
from .pose import NOMINAL_VIEW


@dataclass
class RTPIConfig:
    image_size: int = 64  # X-ray pixels per side fed to the 2D branch
    ct_size: int = 32  # CT cube voxels per side fed to the 3D branch
    width: int = 16  # channels of the first 2D layer (doubled once)
    ct_width: int = 8  # channels of the 3D branch
    blocks: int = 4  # residual blocks of the localisation network (the paper's four)
    head_hidden: int = 32

    def as_dict(self) -> dict:
        return asdict(self)


def _conv2d(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    groups = max(1, min(8, cout // 4))  # GroupNorm: batch statistics would differ between training and one X-ray
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU(True))


class ResidualBlock(nn.Module):
    """Two 3×3 convolutions with a skip (a 1×1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        groups = max(1, min(8, cout // 4))
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(groups, cout),
                                  nn.ReLU(True), nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.GroupNorm(groups, cout))
        self.skip = nn.Identity() if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


def ct_branch_input(ct: Volume, size: int) -> torch.Tensor:
    """The CT as the 3D branch sees it: attenuation (≈1 for water) on a ``size``³ cube, [1, 1, D, H, W].

    Axes are turned to the nominal view's C-arm frame — D along the beam, H down the detector rows,
    W along its columns — so that folding D into channels gives maps aligned with the X-ray's.
    """
    mu = hu_to_attenuation(ct.data.float().clamp_min(-1000.0)) / hu_to_attenuation(torch.zeros(()))
    # array axes (z, y, x) are LPS (z, y, x) only up to the CT's direction; use the direction cosines
    direction = torch.as_tensor(ct.geometry.direction_matrix, dtype=torch.float64)  # columns: index axes i, j, k
    carm_of_index = torch.as_tensor(NOMINAL_VIEW, dtype=torch.float64) @ direction  # C-arm axis of each index axis
    # which index axis (0=x/i, 1=y/j, 2=z/k) runs along each C-arm axis (beam, columns, rows), and its sign
    axis = carm_of_index.abs().argmax(dim=1).tolist()
    sign = [float(carm_of_index[r, axis[r]]) for r in range(3)]
    array_dim = {0: 2, 1: 1, 2: 0}  # index axis i/j/k → tensor dim of (z, y, x)
    order = [array_dim[axis[0]], array_dim[axis[2]], array_dim[axis[1]]]  # beam, rows, columns
    vol = mu.permute(*order)
    flips = [d for d, s in zip((0, 1, 2), (sign[0], sign[2], sign[1])) if s < 0]
    if flips:
        vol = vol.flip(flips)
    return F.adaptive_avg_pool3d(vol[None, None], size).contiguous()


class RTPINet(nn.Module):
    """(CT cube [1, 1, S, S, S], X-rays [B, 1, N, N]) → pose in standard deviations [B, 6]."""

    def __init__(self, config: RTPIConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or RTPIConfig()
        w, cw = c.width, c.ct_width
        # 3D branch: two 3D convolution blocks (paper: "two 3D convolution blocks"), S³ → (S/2)³
        self.ct_branch = nn.Sequential(
            nn.Conv3d(1, cw, 3, 1, 1, bias=False), nn.GroupNorm(2, cw), nn.ReLU(True),
            nn.Conv3d(cw, cw, 3, 2, 1, bias=False), nn.GroupNorm(2, cw), nn.ReLU(True))
        folded = cw * (c.ct_size // 2)  # beam axis folded into channels
        self.ct_fold = nn.Sequential(nn.Conv2d(folded, w, 1, bias=False), nn.GroupNorm(4, w), nn.ReLU(True))
        # 2D branch: N² → (N/4)² to meet the CT maps, whose size is resampled to it
        self.xray_branch = nn.Sequential(_conv2d(1, w, 2), _conv2d(w, 2 * w, 2))
        blocks, cin = [], 3 * w
        for i in range(c.blocks):
            cout = 2 * w * (2 if i >= c.blocks // 2 else 1)
            blocks.append(ResidualBlock(cin, cout, stride=2 if i % 2 == 0 else 1))
            cin = cout
        self.localisation = nn.Sequential(*blocks)
        side = c.image_size // 4 // (2 ** ((c.blocks + 1) // 2))
        self.pool = nn.AdaptiveAvgPool2d(max(1, min(4, side)))  # keeps a coarse layout: translations need it
        features = cin * self.pool.output_size ** 2
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(features, c.head_hidden), nn.ReLU(True),
                                                 nn.Linear(c.head_hidden, 1)) for _ in range(6))

    def ct_features(self, ct_cube: torch.Tensor) -> torch.Tensor:
        f = self.ct_branch(ct_cube)  # [1, C, D, H, W]
        return self.ct_fold(f.flatten(1, 2))  # [1, w, H, W]

    def forward(self, ct_cube: torch.Tensor, xrays: torch.Tensor, ct_maps: torch.Tensor | None = None) -> torch.Tensor:
        """``ct_maps`` (from :meth:`ct_features`) may be passed to reuse one CT's maps across batches."""
        x = self.xray_branch(standardise_images(xrays))
        ct = self.ct_features(ct_cube) if ct_maps is None else ct_maps
        ct = F.interpolate(ct, size=x.shape[-2:], mode="bilinear", align_corners=False).expand(x.shape[0], -1, -1, -1)
        f = self.pool(self.localisation(torch.cat([x, ct], dim=1))).flatten(1)
        return torch.cat([head(f) for head in self.heads], dim=1)


def standardise_images(images: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per image: X-rays and DRRs differ in scale and offset, not in content."""
    mean = images.mean(dim=(-2, -1), keepdim=True)
    std = images.std(dim=(-2, -1), keepdim=True)
    return (images - mean) / (std + 1e-6)
