"""L_sim, the modality-independent similarity MS-ODE is trained with (lower is better).

* ``mind`` (what the shipped models use): mean squared difference of MIND-SSC descriptors
  (:mod:`DeepMultimodalRegLib.metrics.mind`, radius 1, dilation 1 on the working grid).
* ``disa``: minus the mean dot product of DISA descriptors (:mod:`DeepMultimodalRegLib.networks`,
  the shipped ``disa`` weights, frozen; z-scored inputs) — reused, not retrained.
* ``content``: the paper's own (section 2.2, eq. 4): mean squared difference of 3D content features
  from the content encoder of a disentangled translation model (:mod:`.content_similarity`, the
  shipped ``msode_translation`` weights, frozen), over N = 12 slice stacks at fixed positions.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import InvalidParameterError
from ..metrics.mind import mind_ssc, mind_ssd
from .content_similarity import content_distance

SIMILARITIES = ("mind", "disa", "content")
_DISA_CACHE: dict = {}


def _zscore(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(2, 3, 4), keepdim=True)
    std = x.std(dim=(2, 3, 4), keepdim=True).clamp_min(1e-6)
    return (x - mean) / std


def disa_network(device=None):
    key = str(device)
    if key not in _DISA_CACHE:
        from ..networks.disa_net import load_disa_network

        net = load_disa_network("disa", device or "cpu")
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        _DISA_CACHE[key] = net
    return _DISA_CACHE[key]


def similarity_loss(warped: torch.Tensor, fixed: torch.Tensor, kind: str = "mind",
                    per_batch: bool = False, mask: Optional[torch.Tensor] = None,
                    spacing_mm: Optional[float] = None) -> torch.Tensor:
    """L_sim between warped moving and fixed, both [B, 1, D, H, W] on the same grid.

    ``spacing_mm`` (the grid's, isotropic) matters to ``content`` only: its encoder reads slices at
    the spacing it was trained at (None: assume the grid has it).  ``mask`` is used by ``mind``."""
    if kind not in SIMILARITIES:
        raise InvalidParameterError(f"similarity must be one of {SIMILARITIES}, got {kind!r}")
    if warped.shape != fixed.shape:
        raise InvalidParameterError(f"warped {tuple(warped.shape)} and fixed {tuple(fixed.shape)} differ in shape")
    if kind == "mind":
        return mind_ssd(mind_ssc(warped, 1, 1), mind_ssc(fixed, 1, 1), mask=mask, per_batch=per_batch)
    if kind == "content":
        return content_distance(warped, fixed, spacing_mm=spacing_mm, per_batch=per_batch)
    net = disa_network(warped.device)
    a, b = net(_zscore(warped)), net(_zscore(fixed))
    dot = -(a * b).sum(1, keepdim=True)
    per = dot.mean(dim=(1, 2, 3, 4))
    return per if per_batch else per.mean()
