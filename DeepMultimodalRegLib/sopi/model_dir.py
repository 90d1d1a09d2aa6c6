"""A per-patient SOPI model folder: what ``deepmmreg train sopi`` writes and ``--model`` reads.

Files: ``rtpi.pt`` and ``fine.pt`` (state dicts, loaded with ``weights_only=True`` after their
SHA-256 matches), ``structure_mask.nii.gz`` (the structure M on the coarse CT grid), ``sopi_model.json``
(network configs, the C-arm geometry and the CT's fingerprint the networks were trained for, the
training summary), ``SHA256SUMS`` and ``model_card.md``.  A model is only used with the CT and
C-arm it was trained for: anything else gets a clear error, not a silently wrong pose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidParameterError
from ..fileio import atomic_output
from ..image.io import read_volume, write_volume
from ..image.volume import Volume
from ..weights.manifest import sha256_of
from .fine import FineConfig, FineNet
from .geometry import CarmGeometry
from .patient import PatientKit
from .rtpi import RTPIConfig, RTPINet

SPEC = "sopi_model.json"
WEIGHT_FILES = ("rtpi.pt", "fine.pt")
MASK_FILE = "structure_mask.nii.gz"


def ct_fingerprint(ct: Volume) -> dict:
    """The CT's grid and intensity statistics: enough to tell this patient's CT from another."""
    g = ct.geometry
    data = ct.data.float()
    return {"name": ct.name, "shape": list(g.shape), "spacing": [round(float(v), 5) for v in g.spacing],
            "origin": [round(float(v), 4) for v in g.origin], "mean_hu": round(float(data.mean()), 3),
            "std_hu": round(float(data.std()), 3)}


def fingerprint_mismatch(expected: dict, ct: Volume) -> str | None:
    got = ct_fingerprint(ct)
    if got["shape"] != expected["shape"]:
        return f"grid {got['shape']} vs {expected['shape']}"
    for key, tol in (("spacing", 1e-3), ("origin", 0.01)):
        if not np.allclose(got[key], expected[key], atol=tol):
            return f"{key} {got[key]} vs {expected[key]}"
    for key in ("mean_hu", "std_hu"):
        if abs(got[key] - expected[key]) > 0.005 * max(1.0, abs(expected[key])):
            return f"intensities ({key} {got[key]} vs {expected[key]})"
    return None


def geometry_mismatch(trained: CarmGeometry, geometry: CarmGeometry) -> str | None:
    """The same C-arm: distances, physical detector size and principal point (pixel counts may differ)."""
    def close(a, b, tol):
        return abs(a - b) <= tol * max(1.0, abs(b))

    checks = [("source-to-detector distance", geometry.source_to_detector_mm, trained.source_to_detector_mm),
              ("source-to-isocentre distance", geometry.source_to_isocenter_mm, trained.source_to_isocenter_mm),
              ("detector height (mm)", geometry.detector_rows * geometry.pixel_spacing_mm[0],
               trained.detector_rows * trained.pixel_spacing_mm[0]),
              ("detector width (mm)", geometry.detector_cols * geometry.pixel_spacing_mm[1],
               trained.detector_cols * trained.pixel_spacing_mm[1])]
    for what, got, want in checks:
        if not close(got, want, 0.005):
            return f"{what} {got:g} vs {want:g}"
    if not np.allclose(geometry.principal_point_mm, trained.principal_point_mm, atol=0.5):
        return f"principal point {geometry.principal_point_mm} vs {trained.principal_point_mm}"
    return None


@dataclass
class SopiModel:
    rtpi: RTPINet
    fine: FineNet
    spec: dict
    mask: Volume  # structure mask on the coarse CT grid
    path: Path

    @property
    def geometry(self) -> CarmGeometry:
        return CarmGeometry.from_dict(self.spec["geometry"], source=f"{self.path / SPEC}")

    @property
    def sigma(self) -> torch.Tensor:
        return torch.tensor(self.spec["sigma"], dtype=torch.float64)

    def kit(self, ct: Volume) -> PatientKit:
        """The projectors of ``ct`` (checked to be the trained CT) exactly as in training."""
        from .optimize import coarsen_ct

        coarse = coarsen_ct(ct.float(), self.spec["ct_mm"])
        return PatientKit(coarse, self.mask, self.geometry, self.spec["mask_size"], self.rtpi.config.ct_size)


def save_model_dir(out: Path, rtpi: RTPINet, fine: FineNet, mask_coarse: Volume, spec: dict, card: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sums = {}
    for name, net in zip(WEIGHT_FILES, (rtpi, fine)):
        with atomic_output(out / name) as tmp:
            torch.save(net.state_dict(), tmp)
        sums[name] = sha256_of(out / name)
    write_volume(mask_coarse.with_data((mask_coarse.data > 0.5).to(torch.uint8)), out / MASK_FILE)
    spec = {**spec, "sha256": sums, "rtpi": rtpi.config.as_dict(), "fine": fine.config.as_dict()}
    with atomic_output(out / SPEC) as tmp:
        tmp.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    with atomic_output(out / "SHA256SUMS") as tmp:
        tmp.write_text("".join(f"{h}  {n}\n" for n, h in sums.items()), encoding="utf-8")
    with atomic_output(out / "model_card.md") as tmp:
        tmp.write_text(card, encoding="utf-8")


def load_model_dir(model_dir, ct: Volume | None = None, geometry: CarmGeometry | None = None) -> SopiModel:
    """Load and check a model folder; with ``ct``/``geometry``, also that it was trained for them."""
    path = Path(model_dir).expanduser()
    how = "train one with `deepmmreg train sopi CT --geometry G.json -o MODEL_DIR`"
    if not (path / SPEC).is_file():
        raise InvalidParameterError(f"{path} is not a SOPI model folder (no {SPEC}); {how}")
    try:
        spec = json.loads((path / SPEC).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidParameterError(f"cannot read {path / SPEC}: {exc}") from None
    for name in WEIGHT_FILES:
        file = path / name
        if not file.is_file():
            raise InvalidParameterError(f"the SOPI model folder {path} has no {name} (training unfinished?); {how}")
        if sha256_of(file) != spec.get("sha256", {}).get(name):
            raise InvalidParameterError(f"{file} does not match the SHA-256 recorded in {SPEC}: the file is corrupt "
                                        "or was replaced")
    rtpi = RTPINet(RTPIConfig(**spec["rtpi"]))
    rtpi.load_state_dict(torch.load(path / "rtpi.pt", map_location="cpu", weights_only=True))
    fine = FineNet(FineConfig(**spec["fine"]))
    fine.load_state_dict(torch.load(path / "fine.pt", map_location="cpu", weights_only=True))
    rtpi.eval()
    fine.eval()
    model = SopiModel(rtpi, fine, spec, read_volume(path / MASK_FILE).float(), path)
    trained_for = spec["ct"].get("name") or "its training CT"
    if ct is not None:
        why = fingerprint_mismatch(spec["ct"], ct)
        if why:
            raise InvalidParameterError(
                f"the SOPI model in {path} was trained for the CT '{trained_for}', not for '{ct.name}' ({why}); "
                f"SOPI's networks are per patient: {how.replace('CT', 'this CT', 1)}")
    if geometry is not None:
        why = geometry_mismatch(model.geometry, geometry)
        if why:
            raise InvalidParameterError(f"the SOPI model in {path} was trained for another C-arm geometry ({why}); "
                                        f"{how} with this geometry")
    return model
