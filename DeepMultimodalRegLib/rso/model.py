"""The general registration network: MONAI's U-Net with the RSO paper's configuration.

A VoxelMorph-type model: the two-channel input (fixed, moving) on the working grid goes through a
3D U-Net (channels 16/32/64/128/256, strides 2/2/2/2, two residual units per block) whose three
output channels are the displacement in **working-grid voxels** along the grid's (i, j, k) axes.
Predicting voxels rather than millimetres keeps the same weights usable at another working spacing.
The working spacing the weights were trained at travels with them as a buffer, so a ``state_dict``
file alone says how to use it.
"""

from __future__ import annotations

import torch
from torch import nn

#: the U-Net's total stride: working grids are padded to a multiple of this
GRID_MULTIPLE = 16
#: working spacing (mm) assumed for weights that do not say
DEFAULT_WORKING_SPACING_MM = 4.0


class RegistrationNet(nn.Module):
    """(fixed, moving) [B, 2, D, H, W] on the working grid → displacement [B, 3, D, H, W] in voxels (i, j, k)."""

    def __init__(self, working_spacing_mm: float = DEFAULT_WORKING_SPACING_MM):
        super().__init__()
        from monai.networks.nets import UNet

        self.unet = UNet(spatial_dims=3, in_channels=2, out_channels=3, channels=(16, 32, 64, 128, 256),
                         strides=(2, 2, 2, 2), num_res_units=2)
        self.register_buffer("working_spacing_mm", torch.tensor(float(working_spacing_mm), dtype=torch.float64))

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        if pair.dim() != 5 or pair.shape[1] != 2 or any(s % GRID_MULTIPLE for s in pair.shape[2:]):
            raise ValueError(f"the network takes [B, 2, D, H, W] with sizes multiple of {GRID_MULTIPLE}, "
                             f"got {tuple(pair.shape)}")
        return self.unet(pair)

    @property
    def trained_spacing_mm(self) -> float:
        return float(self.working_spacing_mm)


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))
