"""How well can ANY 16-channel descriptor dot product fit the DISA training targets? (issue 3)

A dot product of C-channel descriptors turns the targets of K anchors against S sites of another
crop (the K × S matrix the sampler computes, ``training/disa_sampler.py``) into a matrix of rank
≤ C.  The best rank-C approximation (truncated SVD, Eckart–Young) is therefore an upper bound on
what the DISA network can reach on those pairs, whatever its training: this script reports the
Pearson r and MSE of that bound on t-sampled pairs (the paper's sampling, as the validation uses),
for crops of co-registered scans taken at the same place ("aligned": the pairs registration cares
about) and for crops at unrelated places.  Descriptor norms ≤ 1 are not imposed, so the bound is
loose in that respect.

    python benchmarks/disa_rank_bound.py --pairs 4 --channels 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from DeepMultimodalRegLib.training.disa_sampler import sample_dense_crop_pair  # noqa: E402
from DeepMultimodalRegLib.training.scans import load_prepared_scans  # noqa: E402

CO_REGISTERED = ("kirby21_t1", "kirby21_t2", "kirby21_flair")


def rank_bound(targets: torch.Tensor, channels: int, generator: torch.Generator) -> tuple[float, float]:
    """(Pearson r, MSE) of the best rank-``channels`` fit on one t-sampled partner per anchor."""
    m = targets.reshape(targets.shape[0], -1).double()
    u, s, v = torch.linalg.svd(m, full_matrices=False)
    fit = (u[:, :channels] * s[:channels]) @ v[:channels]
    t = torch.rand(m.shape[0], 1, generator=generator, dtype=torch.double)
    pick = (m - t).abs().argmin(1)
    rows = torch.arange(m.shape[0])
    target, best = m[rows, pick], fit[rows, pick]
    return float(torch.corrcoef(torch.stack([best, target]))[0, 1]), float(((best - target) ** 2).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=4, help="crop pairs per kind")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--anchors", type=int, default=512)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--cache", type=Path, default=None, help="prepared-scan cache of a training run")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    scans = load_prepared_scans(None, "train", 2.0, args.cache)
    generator = torch.Generator().manual_seed(args.seed)
    for aligned in (True, False):
        rs, mses = [], []
        for i in range(args.pairs):
            a, b = CO_REGISTERED[i % 3], CO_REGISTERED[(i + 1) % 3]
            pair = sample_dense_crop_pair(scans[a].data, scans[b].data, args.anchors, generator, aligned=aligned)
            r, mse = rank_bound(pair.targets, args.channels, generator)
            rs.append(round(r, 3))
            mses.append(round(mse, 4))
        kind = "same place (aligned)" if aligned else "unrelated places"
        print(f"{kind}: rank-{args.channels} bound  r {rs}  MSE {mses}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
