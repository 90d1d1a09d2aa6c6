"""The one result type every method returns, and how it is saved.

A result holds the transform (fixed → moving), the warped moving volume, figures (similarity
before/after, times, device, iterations) and a history of steps (an ISO run, each RSO box).
Saving writes, atomically, ``transform.tfm`` (linear) or ``transform.h5`` + ``displacement.nii.gz``
(deformable), ``warped.nii.gz``, ``report.json`` and ``report.png``.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .image.volume import Volume
from .transforms.base import Transform


@dataclass
class RegistrationStep:
    """One step of a registration's history (a stage, an ISO run, an RSO refinement in a box)."""

    name: str
    seconds: float = 0.0
    iterations: int = 0
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class RegistrationResult:
    method: str
    transform: Transform
    warped: Volume
    fixed: Volume
    moving: Volume
    figures: dict[str, Any] = field(default_factory=dict)
    history: list[RegistrationStep] = field(default_factory=list)
    device: str = "cpu"
    seconds: float = 0.0

    def save(self, out_dir: str | Path, protected: Iterable[str | Path] = (), figure: bool = True) -> dict[str, Path]:
        """Write the result files into ``out_dir``; returns their paths by role."""
        from .fileio import check_output_dir
        from .image.io import write_volume
        from .reporting import write_report_json, write_report_png
        from .transforms.itk_io import write_transform

        out = check_output_dir(out_dir, protected)
        out.mkdir(parents=True, exist_ok=True)
        protected = list(protected)
        paths: dict[str, Path] = {}
        if self.transform.is_linear:
            paths["transform"] = write_transform(self.transform, out / "transform.tfm", protected)
        else:
            paths["transform"] = write_transform(self.transform, out / "transform.h5", protected)
            paths["displacement"] = write_transform(self.transform, out / "displacement.nii.gz", protected,
                                                    reference=self.fixed.geometry)
        paths["warped"] = write_volume(self.warped.with_data(self.warped.data.float()), out / "warped.nii.gz", protected)
        paths["report_json"] = write_report_json(self.report_dict(paths), out / "report.json")
        if figure:
            paths["report_png"] = write_report_png(self.fixed, self.moving, self.warped, out / "report.png",
                                                   title=f"{self.method}: {self.fixed.name} ← {self.moving.name}",
                                                   figures=self.figures)
        return paths

    def report_dict(self, paths: dict[str, Path] | None = None) -> dict[str, Any]:
        from . import __version__

        import SimpleITK as sitk
        import torch

        return {
            "method": self.method,
            "fixed": self.fixed.name,
            "moving": self.moving.name,
            "transform_kind": self.transform.kind,
            "figures": self.figures,
            "history": [vars(step) for step in self.history],
            "device": self.device,
            "seconds": round(self.seconds, 3),
            "files": {k: p.name for k, p in (paths or {}).items()},
            "versions": {"deepmultimodalreg": __version__, "torch": torch.__version__,
                         "simpleitk": sitk.Version_VersionString(), "python": platform.python_version()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
