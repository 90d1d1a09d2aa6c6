"""Global search over a bank of turned copies of the fixed image (DISA descriptors are not rotation invariant).

Why: a DISA descriptor describes a patch as it lies on the voxel grid, and descriptors trained to
follow LC² closely describe a patch and its turned copy differently.  When the moving image is
turned far from the fixed one (the capture-range cases go to ±40° about every axis), the similarity
at the true pose can fall below that of a wrong pose: on the Kirby21 T2 case turned (40°, 31°, 30°)
the objective scored 0.046 at the truth and 0.129 at a pose 38 mm away (docs/benchmarks.md), so no
start of the global search ended near the truth.

The remedy: describe turned copies of the fixed image, F_k(x) = F(R_k(x)) with R_k a rotation about
the fixed centre, one forward pass each.  For a pose T (fixed → moving), the moving image matches
F_k under T ∘ R_k, whose rotation is small when R_k undoes most of T's.  Every start of the global
search is therefore optimised against the member whose R_k leaves it the smallest rotation, and its
result is carried back to T = T_k ∘ R_k⁻¹.  Members share the moving map and its centring, so their
similarities are on one scale (their weights differ by the few voxels a rotation moves out of the
grid), and the best candidates of all members are ranked together; the caller's resampled polish
(``refine="disa"``) then judges the best few on descriptors in the fixed frame.

The bank: the identity and the 8 rotations (±a, ±a, ±a) about the Euler axes with a = 0.6 × the
search range (24° for ±40°): every pose of the range is then within about 16° per axis of a member.
Ranges below :data:`MIN_RANGE_DEG` use the identity alone (the plain global search).
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Callable, Optional

import torch

from ..progress import CancelToken, ProgressCallback, ProgressScope
from ..transforms.linear import RigidTransform
from .features import FeaturePair
from .parametrization import RigidParametrization, coordinates_of
from .search import SearchOutcome, SearchSettings, _distinct_best, optimise_starts, random_starts

#: search ranges (degrees) from which the bank has more than the identity
MIN_RANGE_DEG = 15.0
#: bank rotations about each axis as a fraction of the search range
BANK_FRACTION = 0.6


def bank_rotations(range_deg: float) -> list[tuple[float, float, float]]:
    """Euler ZXY angles (radians) of the bank's rotations: the identity first."""
    if range_deg < MIN_RANGE_DEG:
        return [(0.0, 0.0, 0.0)]
    a = math.radians(BANK_FRACTION * range_deg)
    return [(0.0, 0.0, 0.0)] + [tuple(s * a for s in signs) for signs in itertools.product((-1, 1), repeat=3)]


def _rotation_angles(h: torch.Tensor) -> torch.Tensor:
    """[B] rotation angle (radians) of the 3×3 parts of [B, 4, 4] homogeneous matrices."""
    trace = h[:, 0, 0] + h[:, 1, 1] + h[:, 2, 2]
    return torch.arccos(((trace - 1) / 2).clamp(-1, 1))


def bank_search(pair: FeaturePair, rigid_p: RigidParametrization, x_init: torch.Tensor, settings: SearchSettings,
                turned_pair: Callable[[RigidTransform], FeaturePair], seed: int = 0,
                progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> SearchOutcome:
    """The global search of :func:`~.search.search_pose` with its starts spread over the bank.

    ``turned_pair(R)`` gives the feature pair of the fixed image turned by the rigid transform R
    (fixed-space points x → R(x), about the fixed centre) against the same moving map; ``pair`` is the
    identity member.  Returns the best pose over all members, with every member's refined candidates
    (in the original fixed → moving convention), best first.
    """
    settings.validate()
    scope = ProgressScope(progress)
    device = pair.fixed.data.device
    x_init = x_init.to(dtype=torch.float64)
    x0 = random_starts(rigid_p, x_init.cpu(), settings.starts, settings.range_deg, settings.range_mm, seed)
    rotations = bank_rotations(settings.range_deg)
    center = rigid_p.center.reshape(-1, 3)[0]
    members = [RigidTransform(torch.tensor([[*angles, 0.0, 0.0, 0.0]], dtype=torch.float64), center)
               for angles in rotations]
    starts_h = rigid_p.transform(x0).homogeneous().cpu()  # [S, 4, 4]
    leftover = torch.stack([_rotation_angles(starts_h @ m.homogeneous()) for m in members], 1)  # [S, K]
    owner = leftover.argmin(1)
    stages = {"bank_features_s": 0.0}
    xs, sims, evaluations, iterations = [], [], 0, 0
    for k, member in enumerate(members):
        rows = torch.nonzero(owner == k).squeeze(1)
        if rows.numel() == 0:
            continue
        sub = scope.sub(k / len(members), (k + 1) / len(members))
        t0 = time.perf_counter()
        member_pair = pair if k == 0 else turned_pair(member)
        stages["bank_features_s"] += time.perf_counter() - t0
        g = member.homogeneous()[0]
        xk = coordinates_of(rigid_p, starts_h[rows] @ g).to(device)
        keep = min(settings.keep, 1 + math.ceil(settings.keep * rows.numel() / x0.shape[0]))
        outcome = optimise_starts(member_pair, rigid_p, xk, settings, keep, sub, cancel)
        for name, seconds in outcome.stages.items():
            stages[name] = stages.get(name, 0.0) + seconds
        back = rigid_p.transform(outcome.candidates).homogeneous().cpu() @ torch.linalg.inv(g)
        xs.append(coordinates_of(rigid_p, back))
        sims.append(outcome.candidate_similarities.cpu())
        evaluations += outcome.evaluations
        iterations += outcome.iterations
    x_all, sim_all = torch.cat(xs), torch.cat(sims).double()
    order = _distinct_best(x_all, -sim_all, x_all.shape[0])
    stages["bank_members"] = float(len(members))
    return SearchOutcome(x_all[order[:1]].to(device), float(sim_all[order[0]]), evaluations, iterations, stages,
                         x_all[order].to(device), sim_all[order])
