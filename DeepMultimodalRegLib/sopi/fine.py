"""SOPI's iterative fine registration (Chen et al. 2023, section 2.3, Fig. 3, eq. 6–7).

* Two **composite encoders** of the same structure and separate weights (one for DRRs, one for
  X-rays) give multi-scale embedded features: a stem of three convolutions, two downsampling
  convolutions and a cascade-fusion (CF) block; then an *assistant* and a *leader* branch of two
  CF blocks each, the assistant's features fed to the leader through composite-connection units
  (1×1 convolution + normalisation + upsampling) and concatenation.  CF blocks are bottlenecks with
  a two-way split attention, after the paper's references (CFNet, CBNet, ResNeSt), kept small.
* **L_N** (eq. 6): the mean feature distance over the projected structure mask M' = P(θ; M).
* **Training** (eq. 7): the gradient of L_N with respect to the pose, V = ∂L_N/∂θ, should point
  along the gradient of the SE(3) geodesic distance to the true pose, V' = ∂L_G/∂θ; rotation and
  translation parts are compared after normalising each separately.
* **Inference**: normalised gradient steps on θ from the RTPI pose; rotation is frozen after a few
  iterations (the two parts converge at different rates, as the paper notes).

The double backward.  V depends on the networks through ∂L_N/∂I_m (I_m the DRR) and on the pose
through the DRR's Jacobian J = ∂I_m/∂θ, which does not depend on the networks: V = Jᵀ·∂L_N/∂I_m.
So J is computed once per pose, without a graph (forward differences: seven DRRs, cheaper on a CPU
than one backward pass through the projector, and forward-mode autograd has no trilinear sampler
rule), and only ∂L_N/∂I_m is differentiated twice (``torch.autograd.grad(..., create_graph=True)``
through the encoders).  Inference uses the same J, so training and inference follow the same field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .pose import geodesic_distance
from .rtpi import standardise_images

#: forward-difference steps of the DRR Jacobian: degrees ×3, mm ×3 (well above float32 noise,
#: well below the 3–5 mm voxels of the training grid)
JACOBIAN_STEPS = (0.5, 0.5, 0.5, 1.0, 1.0, 1.0)
#: mm per radian of the SE(3) metric whose geodesic gives the target directions (≈ the radius of a torso)
GEODESIC_MM_PER_RADIAN = 100.0


@dataclass
class FineConfig:
    image_size: int = 64
    width: int = 8  # stem channels; branches use 2× and 3×
    embedding: int = 16  # channels of the embedded features (at image_size / 4)

    def as_dict(self) -> dict:
        return asdict(self)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(max(1, min(8, c // 4)), c)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _norm(cout), nn.ReLU(True))


class SplitAttention(nn.Module):
    """A 3×3 convolution in two splits, recombined by per-channel softmax weights from their pooled sum."""

    def __init__(self, channels: int, radix: int = 2) -> None:
        super().__init__()
        self.radix = radix
        self.conv = nn.Sequential(nn.Conv2d(channels, channels * radix, 3, 1, 1, groups=radix, bias=False),
                                  _norm(channels * radix), nn.ReLU(True))
        hidden = max(4, channels // 2)
        self.attend = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(True),
                                    nn.Conv2d(hidden, channels * radix, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        splits = self.conv(x).view(b, self.radix, c, *x.shape[-2:])
        weights = self.attend(splits.sum(1).mean((-2, -1), keepdim=True)).view(b, self.radix, c, 1, 1).softmax(1)
        return (weights * splits).sum(1)


class CFBlock(nn.Module):
    """Cascade-fusion block: 1×1 reduce → split attention → 1×1 expand, with a residual skip."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        mid = max(4, cout // 2)
        self.body = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), _norm(mid), nn.ReLU(True),
                                  nn.AvgPool2d(stride) if stride > 1 else nn.Identity(), SplitAttention(mid),
                                  nn.Conv2d(mid, cout, 1, bias=False), _norm(cout))
        pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.skip = (nn.Identity() if cin == cout and stride == 1 else
                     nn.Sequential(pool, nn.Conv2d(cin, cout, 1, bias=False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class CompositeConnection(nn.Module):
    """Assistant → leader: 1×1 convolution and normalisation (fewer channels), then upsampling."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), _norm(cout))

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(self.reduce(x), size=size, mode="bilinear", align_corners=False)


class CompositeEncoder(nn.Module):
    """Image [B, 1, N, N] → embedded features [B, E, N/4, N/4] mixing two scales (N/4 and N/8)."""

    def __init__(self, config: FineConfig | None = None) -> None:
        super().__init__()
        c = config or FineConfig()
        w = c.width
        self.stem = nn.Sequential(_conv(1, w), _conv(w, w), _conv(w, w),  # shallow features
                                  _conv(w, 2 * w, 2), _conv(2 * w, 2 * w, 2), CFBlock(2 * w, 2 * w))
        a, lead = 2 * w, 3 * w
        self.assistant1, self.assistant2 = CFBlock(2 * w, a), CFBlock(a, a, stride=2)
        self.connect1, self.connect2 = CompositeConnection(a, w), CompositeConnection(a, w)
        self.leader1 = CFBlock(2 * w + w, lead)  # stem ⊕ assistant level 1
        self.leader2 = CFBlock(lead + w, lead, stride=2)  # leader ⊕ assistant level 2 (upsampled to it)
        self.embed = nn.Conv2d(lead + lead, c.embedding, 1)  # both leader scales, at N/4

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        s = self.stem(standardise_images(images))
        a1 = self.assistant1(s)
        a2 = self.assistant2(a1)
        l1 = self.leader1(torch.cat([s, self.connect1(a1, s.shape[-2:])], 1))
        l2 = self.leader2(torch.cat([l1, self.connect2(a2, l1.shape[-2:])], 1))
        up = F.interpolate(l2, size=l1.shape[-2:], mode="bilinear", align_corners=False)
        return self.embed(torch.cat([l1, up], 1))


class FineNet(nn.Module):
    """The two encoders: ``drr_encoder`` for DRRs (moving), ``xray_encoder`` for the X-ray (fixed)."""

    def __init__(self, config: FineConfig | None = None) -> None:
        super().__init__()
        self.config = config or FineConfig()
        self.drr_encoder = CompositeEncoder(self.config)
        self.xray_encoder = CompositeEncoder(self.config)


# ---------------------------------------------------------------------------------- eq. 6
def masked_feature_distance(e_m: torch.Tensor, e_f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_N per pair [B]: Σ M'·‖e_m − e_f‖ / Σ M' over feature pixels (‖·‖ across channels).

    ``mask`` [B, h, w] (weights in [0, 1], resampled to the feature size here); a pair whose mask is
    empty (the structure is off the detector) falls back to the whole image rather than to 0/0.
    """
    m = F.adaptive_avg_pool2d(mask[:, None].float(), e_m.shape[-2:])[:, 0] if mask.shape[-2:] != e_m.shape[-2:] \
        else mask.float()
    empty = m.sum((-2, -1)) < 1e-6
    m = torch.where(empty[:, None, None], torch.ones_like(m), m)
    distance = torch.sqrt(((e_m - e_f) ** 2).sum(1) + 1e-8)  # eps: the norm's gradient at 0
    return (m * distance).sum((-2, -1)) / m.sum((-2, -1))


# ---------------------------------------------------------------------------------- eq. 7
def geodesic_gradient(poses: torch.Tensor, truth: torch.Tensor,
                      mm_per_radian: float = GEODESIC_MM_PER_RADIAN) -> torch.Tensor:
    """V' = ∂L_G/∂θ with L_G = ½ d²(θ, θ̂), d the left-invariant SE(3) geodesic distance, [B, 6].

    It points away from the true pose (a gradient): −V' is the geodesic descent direction.
    """
    p = poses.detach().double().clone().requires_grad_(True)
    loss = 0.5 * (geodesic_distance(p, truth.detach().double(), mm_per_radian) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, p)
    return grad


def direction_loss(v: torch.Tensor, v_target: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Eq. 7 per pair [B]: ‖V'_r/‖V'_r‖ − V_r/‖V_r‖‖ + ‖V'_t/‖V'_t‖ − V_t/‖V_t‖‖, in [0, 4].

    0 when V points exactly along V' (both parts), 4 when exactly against it.
    """
    def unit(x):
        return x / torch.sqrt((x ** 2).sum(-1, keepdim=True) + eps)

    v, v_target = v.double(), v_target.double()
    rot = (unit(v_target[:, :3]) - unit(v[:, :3])).norm(dim=-1)
    trans = (unit(v_target[:, 3:]) - unit(v[:, 3:])).norm(dim=-1)
    return rot + trans


# ---------------------------------------------------------------------------------- pose gradient of L_N
def drr_jacobian(render, poses: torch.Tensor, columns=range(6)) -> tuple[torch.Tensor, torch.Tensor]:
    """DRRs [B, H, W] at ``poses`` [B, 6] and forward-difference Jacobians [B, 6, H, W] (no graph).

    ``render`` maps poses [K, 6] to DRRs [K, H, W]; columns not listed stay zero (frozen parameters).
    All 1 + len(columns) poses of a pair go to the projector in one batch.
    """
    columns = list(columns)
    b = poses.shape[0]
    steps = torch.tensor(JACOBIAN_STEPS, dtype=torch.float64)
    with torch.no_grad():
        shifted = [poses.double()]
        for k in columns:
            p = poses.double().clone()
            p[:, k] += steps[k]
            shifted.append(p)
        images = render(torch.cat(shifted)).float()
    h, w = images.shape[-2:]
    images = images.view(len(shifted), b, h, w)
    jac = torch.zeros(b, 6, h, w, dtype=images.dtype)
    for i, k in enumerate(columns):
        jac[:, k] = (images[i + 1] - images[0]) / float(steps[k])
    return images[0], jac


def pose_gradient(net: FineNet, drr: torch.Tensor, jacobian: torch.Tensor, e_f: torch.Tensor, mask: torch.Tensor,
                  create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_N [B], V = ∂L_N/∂θ [B, 6]) = Jᵀ·∂L_N/∂I_m; with ``create_graph``, V is differentiable in the
    networks' weights."""
    with torch.enable_grad():
        moving = drr.detach().clone().requires_grad_(True)
        e_m = net.drr_encoder(moving[:, None])
        l_n = masked_feature_distance(e_m, e_f, mask)
        (g,) = torch.autograd.grad(l_n.sum(), moving, create_graph=create_graph)
    v = torch.einsum("bkhw,bhw->bk", jacobian.to(g.dtype), g)
    return l_n, v


def fine_training_loss(net: FineNet, render, mask_render, xrays: torch.Tensor, poses: torch.Tensor,
                       truth: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Mean eq. 7 loss for pairs (X-ray taken at ``truth``, DRRs at ``poses``), differentiable in the weights."""
    drr, jac = drr_jacobian(render, poses)
    with torch.no_grad():
        mask = mask_render(poses)
    e_f = net.xray_encoder(xrays[:, None])
    l_n, v = pose_gradient(net, drr, jac, e_f, mask, create_graph=True)
    target = geodesic_gradient(poses, truth)
    loss = direction_loss(v, target).mean()
    return loss, {"l_n": l_n.mean().item(), "eq7": loss.item()}


# ---------------------------------------------------------------------------------- inference
@dataclass
class FineSettings:
    # 12/6: on held-out chest cases 24/10 and 40/20 iterations were no more accurate, only slower
    iterations: int = 12
    rotation_iterations: int = 6  # rotation frozen after these (paper: "after a few iterations")
    step_deg: float = 2.0  # first step of the rotation part (degrees, along the unit direction)
    step_mm: float = 6.0  # first step of the translation part
    min_step_deg: float = 0.05
    min_step_mm: float = 0.1
    shrink: float = 0.5  # step size factor when a part's direction turns back (> 90°)
    grow: float = 1.2  # and when it keeps going


@torch.no_grad()
def refine_pose(net: FineNet, render, mask_render, xray: torch.Tensor, start: torch.Tensor,
                settings: FineSettings | None = None, check=lambda: None) -> tuple[torch.Tensor, list[dict]]:
    """Gradient steps on the pose [6] from ``start``: θ_part ← θ_part − step·V_part/‖V_part‖.

    The learned field gives directions, not distances (eq. 7 trains directions only), so each
    part's step adapts: it shrinks when the direction reverses (the optimum was crossed) and grows
    slowly while it does not.  Returns the final pose and the per-iteration history (L_N, steps).
    """
    s = settings or FineSettings()
    pose = start.detach().double().reshape(1, 6).clone()
    e_f = net.xray_encoder(xray.reshape(1, 1, *xray.shape[-2:]).float())
    steps = [s.step_deg, s.step_mm]
    previous: list[torch.Tensor | None] = [None, None]
    history = []
    for it in range(s.iterations):
        check()
        rotate = it < s.rotation_iterations
        columns = range(6) if rotate else range(3, 6)
        drr, jac = drr_jacobian(render, pose, columns)
        l_n, v = pose_gradient(net, drr, jac, e_f, mask_render(pose), create_graph=False)
        update = torch.zeros(6, dtype=torch.float64)
        for part, sl in enumerate((slice(0, 3), slice(3, 6))):
            if part == 0 and not rotate:
                continue
            d = v[0, sl].double()
            norm = float(d.norm())
            if norm < 1e-12:
                continue
            d = d / norm
            if previous[part] is not None:
                turned = float((d * previous[part]).sum()) < 0
                steps[part] *= s.shrink if turned else s.grow
            limit = (s.min_step_deg, s.min_step_mm)[part]
            steps[part] = max(steps[part], limit)
            previous[part] = d
            update[sl] = -steps[part] * d
        pose = pose + update
        history.append({"iteration": it, "l_n": float(l_n[0]), "step_deg": steps[0] if rotate else 0.0,
                        "step_mm": steps[1]})
    return pose[0], history
