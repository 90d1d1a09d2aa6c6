"""The multi-scale neural-ODE registration model (MS-ODENet) for one parameterisation.

:class:`MSODE` holds one vector-field network per pyramid level and the settings it was trained
with (:class:`MSODEConfig`, stored inside the ``state_dict`` as a JSON byte tensor so a weights
file loads with ``weights_only=True`` and still knows its own grid, levels and solvers).
:meth:`MSODE.solve` integrates θ from θ_0 over [0, T] on the pyramids of a batch of image pairs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import InvalidParameterError
from ..image.geometry import ImageGeometry
from ..progress import CancelToken
from ..transforms.bspline import control_grid_for_domain
from ..metrics.mind import mind_ssc, mind_ssd
from .dynamics import SolveInfo, integrate_multiscale
from .networks import INPUT_MODES, BSplineField, DenseField, RigidField, build_inputs, input_channels
from .solvers import PAPER_LEVELS, PAPER_SOLVERS, PAPER_T, SolverSpec, parse_solvers
from .warp import (BSplineBasis, field_points, grid_points, homogeneous_sampling_grid, rigid_sampling_grid,
                   sample_moving_grid, translation_homogeneous, upsample_field)

KINDS = ("rigid", "bspline", "dense")
#: P's rate of ``gradient_input`` per parameterisation (benchmarks/msode_descent_rate.py).  B-spline:
#: no rate of 1e4–4e7 made the untrained flow reduce the error of synthetic 8 mm-σ B-spline motions at
#: 32³ × 8 mm (median 5.5 mm at the start, 5.5–6.0 mm up to 3e5, worse above); 1e5 keeps the flow
#: gentle, so a trained body, not the raw slope, has to do the work there.  On real scans at 64³ × 4 mm
#: the untrained flow does help, best at 1e6 (msode/flow.py, which sets that rate itself)
DEFAULT_DESCENT_RATES = {"rigid": 2e4, "bspline": 1e5}
CONFIG_KEY = "_msode_config"


@dataclass
class MSODEConfig:
    kind: str = "rigid"
    levels: int = PAPER_LEVELS
    total_time: float = PAPER_T
    #: the paper's notation, coarse to fine; empty: the paper's setting for ``kind``
    solvers: str = ""
    size: int = 64
    spacing_mm: float = 4.0
    inputs: str = "image+mind"
    width: int = 16
    #: B-spline intervals per axis over the working grid (8 → 32 mm knots at 4 mm × 64)
    mesh: int = 8
    #: the similarity L_sim the weights were trained with (mind | disa | content)
    similarity: str = "mind"
    #: rigid and B-spline, not in the paper: f also sees the descent direction −P·∂L_sim/∂θ of the MIND-SSC
    #: distance at the current pose (a learned optimiser that is told the local slope, as in
    #: learning-to-optimise work) and adds it, gated, to its output.  The paper's f sees the images
    #: only; models trained that way stop ~10 mm from the answer on every contrast
    #: (docs/benchmarks.md, "is the miss on real scans a contrast gap?").
    gradient_input: bool = False
    #: rigid: P = descent_rate · diag(1/R², 1/R², 1/R², 1, 1, 1), R = descent_radius_mm: rotations weigh by
    #: the displacement they cause at R, so the untrained flow moves every point at a similar rate
    #: (rate 2e4 at R = 60 mm: the best untrained flow of 5e3–4e4 on 12 synthetic ±25° pairs at
    #: 32³ × 8 mm with F(0.1) steps, median RMSE(φ) 24.4 → 2.9 mm; 4e4 oscillates;
    #: benchmarks/msode_descent_rate.py).  B-spline: P = descent_rate (every coefficient alike).
    #: None: the kind's default (DEFAULT_DESCENT_RATES)
    descent_rate: Optional[float] = None
    descent_radius_mm: float = 60.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidParameterError(f"MS-ODE parameterisation must be one of {KINDS}, got {self.kind!r}")
        if self.inputs not in INPUT_MODES:
            raise InvalidParameterError(f"inputs must be one of {INPUT_MODES}, got {self.inputs!r}")
        if self.levels < 1 or self.total_time <= 0:
            raise InvalidParameterError(f"need L ≥ 1 and T > 0, got L={self.levels}, T={self.total_time}")
        if self.gradient_input and self.kind == "dense":
            raise InvalidParameterError("gradient_input is implemented for the rigid and B-spline parameterisations only")
        if self.descent_rate is None:
            self.descent_rate = DEFAULT_DESCENT_RATES.get(self.kind, DEFAULT_DESCENT_RATES["rigid"])
        if self.descent_rate <= 0 or self.descent_radius_mm <= 0:
            raise InvalidParameterError(f"descent_rate and descent_radius_mm must be positive, got "
                                        f"{self.descent_rate} and {self.descent_radius_mm}")

    def descent_preconditioner(self) -> torch.Tensor:
        if self.kind == "bspline":
            return torch.tensor(float(self.descent_rate))
        inv_r2 = 1.0 / self.descent_radius_mm ** 2
        return self.descent_rate * torch.tensor([inv_r2] * 3 + [1.0] * 3)

    def solver_specs(self) -> tuple[SolverSpec, ...]:
        specs = parse_solvers(self.solvers) if self.solvers else PAPER_SOLVERS[self.kind]
        if not self.solvers and self.levels != len(specs):
            specs = (specs[0],) * (self.levels - 1) + (specs[-1],)
        if len(specs) != self.levels:
            raise InvalidParameterError(f"{self.levels} levels need {self.levels} solvers, got {len(specs)}")
        return specs


class LevelField(nn.Module):
    """f^(l)(x_moving ∘ φ_θ, x_fixed, t) on one pyramid level of one batch of pairs."""

    def __init__(self, network: nn.Module, kind: str, inputs: str, fixed: torch.Tensor, moving: torch.Tensor,
                 fixed_geometry: ImageGeometry, moving_geometry: ImageGeometry, c_fixed: torch.Tensor,
                 c_moving: torch.Tensor, pre: Optional[torch.Tensor] = None, basis: Optional[BSplineBasis] = None,
                 control_shape: Optional[tuple] = None, descent_preconditioner: Optional[torch.Tensor] = None,
                 fixed_mind: Optional[torch.Tensor] = None):
        super().__init__()
        #: P of the descent input (rigid models with ``gradient_input``), None otherwise
        self.descent_preconditioner = descent_preconditioner
        self.network, self.kind, self.inputs = network, kind, inputs
        self.fixed, self.moving = fixed, moving
        self.moving_geometry = moving_geometry
        self.fixed_geometry = fixed_geometry
        self._points: Optional[torch.Tensor] = None
        self.c_fixed, self.c_moving, self.pre = c_fixed, c_moving, pre
        self.basis, self.control_shape = basis, control_shape
        #: the fixed image's MIND-SSC (r = 1, d = 1): given by :meth:`MSODE.level_field` where the network or
        #: the descent needs it, else computed on first use (:meth:`_fixed_descriptor`)
        self.fixed_mind = fixed_mind

    @property
    def points(self) -> torch.Tensor:
        """Physical positions [D, H, W, 3] of the level's voxel centres, made on first use (a rigid warp maps
        voxel indices directly, :func:`~.warp.rigid_sampling_grid`, and never needs them)."""
        if self._points is None:
            self._points = grid_points(self.fixed_geometry, self.fixed.device, self.fixed.dtype)
        return self._points

    def _fixed_descriptor(self) -> torch.Tensor:
        if self.fixed_mind is None:
            self.fixed_mind = mind_ssc(self.fixed, radius=1, dilation=1)
        return self.fixed_mind

    def displacement(self, theta: torch.Tensor) -> torch.Tensor:
        return self.basis(theta) if self.kind == "bspline" else theta

    def warp(self, theta: torch.Tensor) -> torch.Tensor:
        if self.kind == "rigid":
            grid = rigid_sampling_grid(theta, self.c_fixed, self.c_moving, self.fixed_geometry, self.moving_geometry)
        else:
            grid = homogeneous_sampling_grid(self.pre, field_points(self.points, self.displacement(theta)),
                                             self.moving_geometry)
        return sample_moving_grid(self.moving, self.moving_geometry, grid)

    def mind_distance(self, theta: torch.Tensor) -> torch.Tensor:
        """The MIND-SSC distance [B] between the moving warped by θ and the fixed image on this level
        (the fixed image's descriptors computed once per field)."""
        return mind_ssd(mind_ssc(self.warp(theta), radius=1, dilation=1), self._fixed_descriptor(), per_batch=True)

    def _descent_with_warp(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(−P·∂L_sim/∂θ, the warped moving image, its MIND-SSC), all detached from θ."""
        with torch.enable_grad():
            th = theta.detach().requires_grad_(True)
            warped = self.warp(th)
            warped_mind = mind_ssc(warped, radius=1, dilation=1)
            loss = mind_ssd(warped_mind, self._fixed_descriptor(), per_batch=True)
            (grad,) = torch.autograd.grad(loss.sum(), th)
        return -grad * self.descent_preconditioner.to(grad), warped.detach(), warped_mind.detach()

    def descent(self, theta: torch.Tensor) -> torch.Tensor:
        """−P·∂L_sim/∂θ per pair (shaped like θ), L_sim the MIND-SSC distance on this level's grid.

        A feature, like the images: it is computed on a detached copy of θ, so training does not
        differentiate through it (no second derivatives of the resampler)."""
        return self._descent_with_warp(theta)[0]

    def forward(self, t: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        if self.descent_preconditioner is not None and not torch.is_grad_enabled():
            # registration: the slope's warp and MIND-SSC are the network's inputs too (same θ),
            # so they are computed once; training needs inputs that carry θ's graph, below
            descent, warped, warped_mind = self._descent_with_warp(theta)
            if self.network.body_is_silent:
                # zero output layers (an untrained gradient-flow level): the network's pass would add
                # exactly 0 to the gated descent (same result, less time)
                return self.network.descent_term(descent)
            return self._network(build_inputs(warped, self.fixed, self.inputs, self.fixed_mind, warped_mind), t, descent)
        x = build_inputs(self.warp(theta), self.fixed, self.inputs, self.fixed_mind)
        return self._network(x, t, self.descent(theta) if self.descent_preconditioner is not None else None)

    def _network(self, x: torch.Tensor, t: torch.Tensor, descent: Optional[torch.Tensor]) -> torch.Tensor:
        if self.kind == "bspline":
            return self.network(x, t, self.control_shape, descent)
        return self.network(x, t) if descent is None else self.network(x, t, descent)


@dataclass
class PairBatch:
    """A batch of image pairs on their working grids, with pyramids (coarse → fine)."""

    fixed: list[torch.Tensor]  # [B, 1, D, H, W] per level
    moving: list[torch.Tensor]
    fixed_geometries: list[ImageGeometry]
    moving_geometries: list[ImageGeometry]
    c_fixed: torch.Tensor  # [B, 3]
    c_moving: torch.Tensor
    #: the fixed images' MIND-SSC by level counted from the finest (−1), filled by :meth:`fixed_mind`;
    #: :meth:`finest`'s batch shares it, its levels keep those numbers
    fixed_minds: dict = field(default_factory=dict, repr=False, compare=False)

    def fixed_mind(self, level: int) -> torch.Tensor:
        """MIND-SSC (r = 1, d = 1) of the fixed images on pyramid level ``level``, computed once per batch:
        a hybrid's two stages both need the 64³ one."""
        key = level - len(self.fixed) if level >= 0 else level
        if key not in self.fixed_minds:
            self.fixed_minds[key] = mind_ssc(self.fixed[key], radius=1, dilation=1)
        return self.fixed_minds[key]

    @property
    def batch(self) -> int:
        return self.fixed[-1].shape[0]

    def to(self, device) -> "PairBatch":
        """The same pairs with every tensor on ``device`` (geometries are plain numbers)."""
        return PairBatch([x.to(device) for x in self.fixed], [x.to(device) for x in self.moving],
                         self.fixed_geometries, self.moving_geometries, self.c_fixed.to(device),
                         self.c_moving.to(device))

    def finest(self, levels: int) -> "PairBatch":
        """The same pairs with only the ``levels`` finest pyramid levels: what a ``levels``-level model
        of the same working grid would have prepared (each level is the 2× average of the next)."""
        if not 1 <= levels <= len(self.fixed):
            raise ValueError(f"cannot keep {levels} of {len(self.fixed)} pyramid levels")
        return PairBatch(self.fixed[-levels:], self.moving[-levels:], self.fixed_geometries[-levels:],
                         self.moving_geometries[-levels:], self.c_fixed, self.c_moving, self.fixed_minds)


class MSODE(nn.Module):
    """MS-ODENet: one network per level; :meth:`solve` returns θ(T) and the solver's record."""

    def __init__(self, config: MSODEConfig | None = None):
        super().__init__()
        self.config = config or MSODEConfig()
        c = self.config
        channels = input_channels(c.inputs)
        if c.kind == "rigid":
            nets = [RigidField(channels, c.width, gradient_input=c.gradient_input) for _ in range(c.levels)]
        elif c.kind == "bspline":
            nets = [BSplineField(channels, c.width, gradient_input=c.gradient_input) for _ in range(c.levels)]
        else:
            nets = [DenseField(channels, (c.width, 2 * c.width, 2 * c.width)) for _ in range(c.levels)]
        self.fields = nn.ModuleList(nets)

    # ------------------------------------------------------------------ weights with their settings
    def state_dict_with_config(self) -> dict:
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        state[CONFIG_KEY] = torch.tensor(list(json.dumps(asdict(self.config)).encode()), dtype=torch.uint8)
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> "MSODE":
        if CONFIG_KEY not in state:
            raise InvalidParameterError("these weights are not an MS-ODE model (no stored configuration)")
        config = MSODEConfig(**json.loads(bytes(state[CONFIG_KEY].tolist()).decode()))
        # built without initialising its parameters (every one is overwritten next, so the random
        # initialisation was wasted work), then filled from the file
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device="cpu")
        model.load_state_dict({k: v for k, v in state.items() if k != CONFIG_KEY})
        return model

    # ------------------------------------------------------------------ θ
    def control_grid(self, fixed_geometry: ImageGeometry) -> ImageGeometry:
        return control_grid_for_domain(fixed_geometry, mesh_size=(self.config.mesh,) * 3)

    def initial_theta(self, pairs: PairBatch) -> torch.Tensor:
        b, ref = pairs.batch, pairs.fixed[-1]
        if self.config.kind == "rigid":
            return torch.zeros(b, 6, dtype=ref.dtype, device=ref.device)
        if self.config.kind == "bspline":
            return torch.zeros(b, 3, *self.control_grid(pairs.fixed_geometries[-1]).shape, dtype=ref.dtype,
                               device=ref.device)
        return torch.zeros(b, 3, *pairs.fixed[0].shape[2:], dtype=ref.dtype, device=ref.device)

    def level_fields(self, pairs: PairBatch, pre: Optional[torch.Tensor] = None) -> list[LevelField]:
        if len(pairs.fixed) != self.config.levels:
            raise InvalidParameterError(f"the model has {self.config.levels} levels, the pyramid {len(pairs.fixed)}")
        return [self.level_field(pairs, level, pre) for level in range(self.config.levels)]

    def level_field(self, pairs: PairBatch, level: int, pre: Optional[torch.Tensor] = None) -> LevelField:
        """f^(level) bound to the pairs' images on that pyramid level."""
        c = self.config
        if c.kind != "rigid" and pre is None:
            pre = translation_homogeneous(pairs.c_fixed, pairs.c_moving)
        control = self.control_grid(pairs.fixed_geometries[-1]) if c.kind == "bspline" else None
        geometry = pairs.fixed_geometries[level]
        basis = BSplineBasis(control, geometry, pairs.fixed[level].device) if control is not None else None
        return LevelField(self.fields[level], c.kind, c.inputs, pairs.fixed[level], pairs.moving[level],
                          geometry, pairs.moving_geometries[level], pairs.c_fixed, pairs.c_moving, pre,
                          basis, control.shape if control is not None else None,
                          c.descent_preconditioner() if c.gradient_input else None,
                          pairs.fixed_mind(level) if c.inputs != "image" or c.gradient_input else None)

    def solve(self, pairs: PairBatch, theta0: Optional[torch.Tensor] = None, pre: Optional[torch.Tensor] = None,
              solvers: Optional[Sequence[SolverSpec]] = None, backprop: str = "direct",
              cancel: Optional[CancelToken] = None, on_level=None) -> tuple[torch.Tensor, SolveInfo, list[LevelField]]:
        fields = self.level_fields(pairs, pre)
        theta0 = self.initial_theta(pairs) if theta0 is None else theta0
        handover = (lambda level, th: upsample_field(th)) if self.config.kind == "dense" else None
        theta, info = integrate_multiscale(fields, theta0, self.config.total_time, solvers or self.config.solver_specs(),
                                           handover, backprop, cancel, on_level)
        return theta, info, fields
