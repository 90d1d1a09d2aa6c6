"""A teacher embedding that gives the DISA network a per-voxel regression target.

Why.  The paper's loss asks the dot product of two descriptors to equal the LC² target of their
patches.  Trained that way from scratch on 2 CPU cores, the network learns slowly and its
descriptors collapse onto one or two directions (docs/benchmarks.md): a bilinear loss starts at
a saddle and every pair only tells it about one product.  Yet a 16-dimensional embedding that
explains held-out LC² well exists and is cheap to compute by brute force:

* pick L landmark patches (∝ local variance, as LC² weighs them) from the training scans;
* describe any patch p by its **symmetric** LC² against every landmark,
  ``k(p)_l = ½(LC²(p | l) + LC²(l | p))`` averaged over the DISA radii 3, 5, 7 (the network's dot
  product is symmetric, so the symmetric mean is the most it can match);
* map it linearly to 16 dimensions, ``e(p) = Wᵀ k(p)``, with W started at the Nyström solution
  (the top 16 eigenvectors of the landmarks' own LC² matrix, ``W = V Λ^{-1/2}``) and refined so that
  ``⟨e(p), e(q)⟩`` fits the directional LC² of sampled patch pairs under the paper's t-sampling
  weights; every ``e`` is clipped to norm 1 as the network's output is.

On Kirby21/MNI152/voxelmorph/LIDC patches and held-out Colin27/pelvis-CT patches (ad hoc check,
2026-11-22): Nyström alone gives t-sampled held-out Pearson r 0.72–0.74 against the LC² target
(256–2400 landmarks), the refined W 0.82, where the network trained by the pairwise loss reaches
0.34.  The teacher is computed on whole scans once: every landmark is a 3D convolution kernel, so
``k`` at every stride-4 site of a scan (the descriptor grid) costs a few seconds.

The network then learns ``e`` at every descriptor voxel of a crop by plain regression
(:func:`distillation_loss`), which is well conditioned; the paper's pairwise loss can follow
(``train disa --distil-steps``).  The teacher is a training device only; it is not shipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..metrics.lc2 import (DISA_RADII, lc2_patches_against_volume, lc2_volume_against_patches,
                           patch_lc2_matrix)
from ..metrics.local_stats import extract_patches, gradient_magnitude, local_variance
from ..networks.disa_net import DESCRIPTOR_CHANNELS, OUTPUT_STRIDE, clip_descriptor_norm
from .disa_sampler import t_sampling_weights

#: patch centres stay this far from a scan's faces, so every landmark patch (radius ≤ 7) is inside it
_BORDER = max(DISA_RADII) + 1


@dataclass
class PatchSet:
    """Patches of z-scored scans at every DISA radius: intensity and gradient magnitude, [N, (2r+1)³]."""

    intensity: dict[int, torch.Tensor]
    gradient: dict[int, torch.Tensor]

    def __len__(self) -> int:
        return int(self.intensity[DISA_RADII[0]].shape[0])

    def subset(self, index: torch.Tensor) -> "PatchSet":
        return PatchSet({r: v[index] for r, v in self.intensity.items()},
                        {r: v[index] for r, v in self.gradient.items()})


def _zscored(data: torch.Tensor) -> torch.Tensor:
    x = data.double()
    return (x - x.mean()) / x.std().clamp_min(1e-12)


def sample_patches(volumes: list[torch.Tensor], per_volume: int, generator: torch.Generator) -> PatchSet:
    """``per_volume`` patches of each volume, centres drawn ∝ the local variance (radius 7, the LC²
    weight) among the voxels at least 8 voxels from every face."""
    intensity = {r: [] for r in DISA_RADII}
    gradient = {r: [] for r in DISA_RADII}
    for data in volumes:
        x = _zscored(data)
        grad = gradient_magnitude(x)
        weight = local_variance(x, max(DISA_RADII)).clamp_min(0)
        inner = torch.zeros_like(weight, dtype=torch.bool)
        inner[_BORDER:-_BORDER, _BORDER:-_BORDER, _BORDER:-_BORDER] = True
        weight = torch.where(inner, weight, torch.zeros_like(weight)).reshape(-1).float()
        flat = torch.multinomial(weight / weight.sum(), per_volume, replacement=False, generator=generator)
        _, h, w = x.shape
        centres = torch.stack([flat // (h * w), (flat // w) % h, flat % w], 1)
        for r in DISA_RADII:
            intensity[r].append(extract_patches(x, centres, r))
            gradient[r].append(extract_patches(grad, centres, r))
    return PatchSet({r: torch.cat(v) for r, v in intensity.items()}, {r: torch.cat(v) for r, v in gradient.items()})


def directional_targets(fitted: PatchSet, regressors: PatchSet) -> torch.Tensor:
    """DISA targets [Nf, Nr] (mean LC² over the radii) of every fitted patch against every regressor."""
    return torch.stack([patch_lc2_matrix(fitted.intensity[r], regressors.intensity[r], regressors.gradient[r])
                        for r in DISA_RADII]).mean(0)


def symmetric_targets(patches: PatchSet, landmarks: PatchSet) -> torch.Tensor:
    """½(target(p | l) + target(l | p)) of every patch against every landmark, [N, L]."""
    return 0.5 * (directional_targets(patches, landmarks) + directional_targets(landmarks, patches).T)


@dataclass
class LandmarkTeacher:
    """``e(p) = clip(Wᵀ k(p))`` with ``k`` the symmetric DISA target against the landmarks."""

    landmarks: PatchSet
    projection: torch.Tensor  # [L, 16], float64

    def features_at_sites(self, data: torch.Tensor) -> torch.Tensor:
        """``k`` at every stride-4 voxel of a volume [D, H, W] (replicate padding at the faces): [L, d, h, w]."""
        total = None
        for r in DISA_RADII:
            forward = lc2_patches_against_volume(self.landmarks.intensity[r], data, r, OUTPUT_STRIDE, pad=True)
            backward = lc2_volume_against_patches(data, self.landmarks.intensity[r], self.landmarks.gradient[r], r,
                                                  OUTPUT_STRIDE, pad=True)
            both = 0.5 * (forward + backward)
            total = both if total is None else total + both
        return total / len(DISA_RADII)

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """Embedding of features [L, ...] → [16, ...] (norm ≤ 1)."""
        shape = features.shape[1:]
        e = self.projection.to(features.dtype).T @ features.reshape(features.shape[0], -1)
        return clip_descriptor_norm(e.reshape(-1, *shape), dim=0)

    def embed_volume(self, data: torch.Tensor) -> torch.Tensor:
        """The teacher's descriptor map of a volume: [16, ceil(D/4), ceil(H/4), ceil(W/4)], float32, on the
        descriptor grid of :func:`~DeepMultimodalRegLib.networks.disa_net.descriptor_geometry`."""
        return self.embed_features(self.features_at_sites(data)).float()

    def state_dict(self) -> dict:
        """Plain tensors, loadable with ``torch.load(..., weights_only=True)``."""
        out = {"projection": self.projection}
        for r in DISA_RADII:
            out[f"intensity_{r}"] = self.landmarks.intensity[r]
            out[f"gradient_{r}"] = self.landmarks.gradient[r]
        return out

    @classmethod
    def from_state_dict(cls, state: dict) -> "LandmarkTeacher":
        landmarks = PatchSet({r: state[f"intensity_{r}"] for r in DISA_RADII},
                             {r: state[f"gradient_{r}"] for r in DISA_RADII})
        return cls(landmarks, state["projection"])


def nystrom_projection(landmarks: PatchSet, dimensions: int = DESCRIPTOR_CHANNELS) -> torch.Tensor:
    """``W = V Λ^{-1/2}`` from the top eigenpairs of the landmarks' symmetric target matrix, [L, dims]:
    then ``⟨Wᵀk(p), Wᵀk(q)⟩`` is the Nyström approximation of the symmetric target of p and q."""
    gram = symmetric_targets(landmarks, landmarks)
    values, vectors = torch.linalg.eigh(0.5 * (gram + gram.T))
    return vectors[:, -dimensions:] / values[-dimensions:].clamp_min(1e-6).sqrt()


def build_teacher(volumes: list[torch.Tensor], generator: torch.Generator, landmarks: int = 384,
                  fit_patches_per_volume: int = 400, fit_steps: int = 800, learning_rate: float = 1e-3) -> tuple[LandmarkTeacher, dict]:
    """Landmarks from ``volumes`` (prepared training scans), Nyström start, then W refined on the
    t-sampling-weighted fit of the directional targets of other sampled patches.  Returns the
    teacher and a small report (weighted loss before and after the refinement)."""
    per_volume = max(1, landmarks // len(volumes))
    marks = sample_patches(volumes, per_volume, generator)
    fit = sample_patches(volumes, fit_patches_per_volume, generator)
    features = symmetric_targets(fit, marks).float()  # [N, L]
    targets = directional_targets(fit, fit).float()  # [N, N]
    n = targets.shape[0]
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    # a patch is never its own candidate: the diagonal goes to -1, where its cell of [0, 1] is empty
    weights = t_sampling_weights(targets.masked_fill(~off_diagonal, -1.0).clamp_min(0)) * off_diagonal
    weights = weights / weights.sum()
    projection = nystrom_projection(marks).float().requires_grad_(True)
    optimiser = torch.optim.Adam([projection], lr=learning_rate)

    def weighted_loss() -> torch.Tensor:
        e = clip_descriptor_norm(features @ projection, dim=1)
        return (weights * (e @ e.T - targets) ** 2).sum()

    with torch.no_grad():
        before = float(weighted_loss())
    for _ in range(fit_steps):
        loss = weighted_loss()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        after = float(weighted_loss())
    teacher = LandmarkTeacher(marks, projection.detach().double())
    return teacher, {"landmarks": len(marks), "fit_patches": n, "fit_steps": fit_steps,
                     "weighted_loss_nystrom": before, "weighted_loss_refined": after}


def teacher_targets_for_crop(embedding: torch.Tensor, corner, crop: int) -> torch.Tensor:
    """The teacher's descriptors [16, c, c, c] of the crop at ``corner`` (multiples of 4) of side ``crop``:
    the descriptor-grid slice of the scan's teacher map."""
    if any(int(c) % OUTPUT_STRIDE for c in corner):
        raise ValueError(f"teacher crops start on the descriptor grid (multiples of {OUTPUT_STRIDE}), got {corner}")
    k, j, i = (int(c) // OUTPUT_STRIDE for c in corner)
    side = -(-crop // OUTPUT_STRIDE)
    return embedding[:, k:k + side, j:j + side, i:i + side]


def _sample_at(volume: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of ``volume`` [C, D, H, W] at voxel positions [..., 3] (k, j, i), edge values
    beyond the faces: [C, ...]."""
    sizes = torch.tensor(volume.shape[1:], dtype=positions.dtype, device=positions.device)
    normalised = (2 * positions / (sizes - 1) - 1).flip(-1)  # grid_sample wants (x, y, z) = (i, j, k)
    grid = normalised.reshape(1, 1, 1, -1, 3).to(volume.dtype)
    out = F.grid_sample(volume[None], grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(volume.shape[0], *positions.shape[:-1])


def rotated_crop_with_targets(data: torch.Tensor, embedding: torch.Tensor, corner, crop: int,
                              rotation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A crop of side ``crop`` at ``corner`` (multiples of 4) of ``data`` turned by ``rotation`` (3×3, in
    voxel axes k, j, i) about its centre, and the teacher targets [16, s, s, s] at its descriptor sites.

    Crop voxel u shows the scan at ``c + R(u − c)`` (c: the crop centre), and its descriptor is asked
    to equal the teacher's at that same point of the scan, interpolated on the teacher's stride-4 map:
    descriptors that follow the anatomy whatever its orientation.  Why: the registration objective
    compares the fixed descriptor at x with the moving one at T(x) without turning the descriptor,
    so a moving image rotated by 35° must describe a point as the upright image does (weights trained
    on upright crops only moved their optimum 5–7 mm off the truth at 35°, docs/benchmarks.md)."""
    if any(int(c) % OUTPUT_STRIDE for c in corner):
        raise ValueError(f"teacher crops start on the descriptor grid (multiples of {OUTPUT_STRIDE}), got {corner}")
    rotation = rotation.to(torch.float64)
    origin = torch.tensor([float(c) for c in corner], dtype=torch.float64)
    centre = origin + (crop - 1) / 2

    def scan_positions(offsets: torch.Tensor) -> torch.Tensor:  # crop offsets [..., 3] → scan voxel positions
        return centre + (origin + offsets - centre) @ rotation.T

    axis = torch.arange(crop, dtype=torch.float64)
    voxels = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1)
    side = -(-crop // OUTPUT_STRIDE)
    site_axis = OUTPUT_STRIDE * torch.arange(side, dtype=torch.float64)
    sites = torch.stack(torch.meshgrid(site_axis, site_axis, site_axis, indexing="ij"), -1)
    image = _sample_at(data[None].double(), scan_positions(voxels))[0].to(data.dtype)
    targets = _sample_at(embedding.double(), scan_positions(sites) / OUTPUT_STRIDE).to(embedding.dtype)
    return image, targets


def distillation_loss(descriptors: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between network descriptors and the teacher's, [B, 16, ...] each."""
    return ((descriptors - targets) ** 2).sum(1).mean()
