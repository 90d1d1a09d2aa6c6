"""The vector fields f^(l) of MS-ODE, one network per pyramid level (paper section 2.1).

Each network sees the current warped moving image and the fixed image (and, with
``inputs="image+mind"``, their MIND-SSC descriptors: 12 + 12 more channels that make contrast
differences smaller from the first step on) and the time t, and returns dθ/dt:

* :class:`RigidField`: convolutions, then fully connected layers → 6 rates (rad, mm per unit time);
* :class:`BSplineField`: fully convolutional; the output field is averaged onto the control grid;
* :class:`DenseField`: MONAI's U-Net → a 3-component velocity on the level's grid.

Final layers start at zero, so an untrained network leaves θ where it is.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from ..errors import InvalidParameterError
from ..metrics.mind import mind_ssc

INPUT_MODES = ("image", "image+mind")


def input_channels(inputs: str) -> int:
    return 2 if inputs == "image" else 26


def build_inputs(warped: torch.Tensor, fixed: torch.Tensor, inputs: str,
                 fixed_mind: torch.Tensor | None = None, warped_mind: torch.Tensor | None = None) -> torch.Tensor:
    """[B, C, D, H, W] network input from warped moving and fixed [B, 1, D, H, W] (their MIND-SSC
    descriptors are computed here unless given)."""
    if inputs == "image":
        return torch.cat([warped, fixed], 1)
    if fixed_mind is None:
        fixed_mind = mind_ssc(fixed, radius=1, dilation=1)
    if warped_mind is None:
        warped_mind = mind_ssc(warped, radius=1, dilation=1)
    return torch.cat([warped, fixed, warped_mind, fixed_mind], 1)


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride, 1), nn.GroupNorm(min(4, cout), cout), nn.LeakyReLU(0.2))


class RigidField(nn.Module):
    """dθ/dt for θ = (rx, ry, rz, tx, ty, tz): rates scaled to ``rotation_scale`` rad and
    ``translation_scale`` mm per unit time.

    With ``gradient_input`` (not in the paper; see :class:`~.model.MSODEConfig`), ``forward`` also
    takes ``descent`` = −P·∂L_sim/∂θ, the similarity's preconditioned descent direction [B, 6]
    (:meth:`~.model.LevelField.descent`, always the MIND-SSC distance).  The field then is ``head(features, t, descent)·scale +
    gain·descent`` with a positive gain per group (rotation, translation) that the network modulates
    (``gain_head``, zero at the start): an untrained model is a gradient flow on L_sim, which is
    precise near the optimum, and training adds what the gradient cannot see from afar.
    """

    def __init__(self, in_channels: int, width: int = 16, pooled: int = 4, hidden: int = 128,
                 rotation_scale: float = 0.5, translation_scale: float = 10.0, gradient_input: bool = False):
        super().__init__()
        self.features = nn.Sequential(_block(in_channels, width, 2), _block(width, 2 * width, 2),
                                      _block(2 * width, 2 * width, 2), _block(2 * width, 4 * width, 2))
        self.pooled = pooled
        self.gradient_input = gradient_input
        extra = 1 + (6 if gradient_input else 0)
        self.head = nn.Sequential(nn.Linear(4 * width * pooled ** 3 + extra, hidden), nn.LeakyReLU(0.2),
                                  nn.Linear(hidden, 6))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        self.register_buffer("scale", torch.tensor([rotation_scale] * 3 + [translation_scale] * 3))
        if gradient_input:
            # log-gain of the descent term per group, modulated per state by the hidden layer
            self.gain_head = nn.Linear(hidden, 2)
            nn.init.zeros_(self.gain_head.weight)
            nn.init.zeros_(self.gain_head.bias)

    @property
    def body_is_silent(self) -> bool:
        """True when the learned rate and the gain's modulation are both zero (an untrained gradient-flow
        level, as the shipped model's finest one): the field is then the gated descent alone, whatever the
        images, so a caller may skip the convolutions and their input stack."""
        return (self.gradient_input and not bool(self.head[-1].weight.any()) and not bool(self.head[-1].bias.any())
                and not bool(self.gain_head.weight.any()))

    def descent_term(self, descent: torch.Tensor) -> torch.Tensor:
        """The field of a silent body (:attr:`body_is_silent`): the gain is exp(bias) then."""
        return torch.exp(self.gain_head.bias.clamp(-6.0, 3.0)).repeat_interleave(3) * descent

    def forward(self, x: torch.Tensor, t: torch.Tensor, descent: torch.Tensor | None = None) -> torch.Tensor:
        h = F.adaptive_avg_pool3d(self.features(x), self.pooled).flatten(1)
        tt = t.to(h.dtype).reshape(1, 1).expand(h.shape[0], 1)
        if not self.gradient_input:
            return self.head(torch.cat([h, tt], 1)) * self.scale
        if descent is None:
            raise InvalidParameterError("this field was built with gradient_input and needs the descent direction")
        # the descent enters the head squashed (its raw size spans orders of magnitude between
        # far and near poses) and unsquashed through the gated term
        squashed = torch.tanh(descent / self.scale)
        hidden = self.head[1](self.head[0](torch.cat([h, tt, squashed], 1)))
        gain = torch.exp(self.gain_head(hidden).clamp(-6.0, 3.0)).repeat_interleave(3, dim=1)
        return self.head[2](hidden) * self.scale + gain * descent


class BSplineField(nn.Module):
    """dθ/dt for B-spline coefficients [B, 3, gz, gy, gx], fully convolutional, ``scale`` mm per unit time.

    With ``gradient_input`` (not in the paper; see :class:`~.model.MSODEConfig`), ``forward`` also
    takes ``descent`` = −P·∂L_sim/∂θ on the control grid: it enters the body squashed and upsampled to
    the level's grid (3 more channels), and is added to the output with a learned positive gain (one
    per level, 1 at the start); the body's last layer starts at zero, so an untrained model is a
    gradient flow on L_sim over the coefficients, as for :class:`RigidField`.
    """

    def __init__(self, in_channels: int, width: int = 16, scale: float = 5.0, gradient_input: bool = False):
        super().__init__()
        self.gradient_input = gradient_input
        extra = 3 if gradient_input else 0
        self.body = nn.Sequential(_block(in_channels + 1 + extra, width, 2), _block(width, 2 * width, 2),
                                  _block(2 * width, 2 * width), nn.Conv3d(2 * width, 3, 3, 1, 1))
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)
        self.scale = scale
        if gradient_input:
            self.log_gain = nn.Parameter(torch.zeros(1))

    @property
    def body_is_silent(self) -> bool:
        """True when the body's output layer is all zero (an untrained gradient flow, msode/flow.py):
        the body then adds exactly 0 to the descent term, so a caller may skip building its inputs."""
        last = self.body[-1]
        return self.gradient_input and not bool(last.weight.any()) and not bool(last.bias.any())

    def descent_term(self, descent: torch.Tensor) -> torch.Tensor:
        """The gated descent, what :meth:`forward` adds to the body's output (all of it when the body is silent)."""
        return torch.exp(self.log_gain.clamp(-6.0, 3.0)) * descent

    def forward(self, x: torch.Tensor, t: torch.Tensor, control_shape: tuple[int, int, int],
                descent: torch.Tensor | None = None) -> torch.Tensor:
        tt = t.to(x.dtype).expand(x.shape[0], 1, *x.shape[2:])
        if not self.gradient_input:
            return F.adaptive_avg_pool3d(self.body(torch.cat([x, tt], 1)), control_shape) * self.scale
        if descent is None:
            raise InvalidParameterError("this field was built with gradient_input and needs the descent direction")
        squashed = F.interpolate(torch.tanh(descent / self.scale), size=x.shape[2:], mode="trilinear",
                                 align_corners=True)
        learned = F.adaptive_avg_pool3d(self.body(torch.cat([x, tt, squashed], 1)), control_shape) * self.scale
        return learned + self.descent_term(descent)


class DenseField(nn.Module):
    """dθ/dt for a dense displacement [B, 3, D, H, W]: MONAI's U-Net, ``scale`` mm per unit time."""

    def __init__(self, in_channels: int, channels: tuple[int, ...] = (16, 32, 32), scale: float = 5.0):
        super().__init__()
        from monai.networks.nets import UNet

        self.unet = UNet(spatial_dims=3, in_channels=in_channels + 1, out_channels=channels[0], channels=channels,
                         strides=(2,) * (len(channels) - 1), num_res_units=1)
        self.head = nn.Conv3d(channels[0], 3, 1)  # our own output layer, zero at the start
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.scale = scale

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.to(x.dtype).expand(x.shape[0], 1, *x.shape[2:])
        return self.head(torch.nn.functional.leaky_relu(self.unet(torch.cat([x, tt], 1)), 0.2)) * self.scale
