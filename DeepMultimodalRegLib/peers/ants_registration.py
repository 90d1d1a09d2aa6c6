"""ANTsPy (``antspyx``) rigid and SyN registration with Mattes mutual information: benchmark peers.

ANTsPy is a benchmark-only dependency (``pip install deepmultimodalreg[benchmarks]``); it is imported
inside the functions so the library imports without it, and a missing install raises
:class:`NotAvailableError` with the install hint.

ANTs writes the transform that **warps the moving image into the fixed grid**; as a point map that
same transform carries a fixed point x to the moving point φ(x) (``warped(x) = moving(φ(x))``).
The files are read back into the library's own transforms, so the result is an ordinary
:class:`RegistrationResult` whose ``transform`` evaluates φ at any LPS point:

* ``rigid``: ``0GenericAffine.mat`` → an affine transform;
* ``syn``: ANTs' ``fwdtransforms`` list ``[1Warp.nii.gz, 0GenericAffine.mat]`` is applied, as by
  ``antsApplyTransforms``, **affine last**: φ(x) = A(W(x)), i.e. ``CompositeTransform([A, W])``.

Both conventions were checked on a real brain MR moved by a known rigid motion: the converted
transform agrees with ``ants.apply_transforms_to_points(3, points, fwdtransforms)`` (no inversion)
to 3e-5 mm, recovers the known map, and ANTs' own warped image equals the moving image sampled at
φ(x).  :func:`ants_transform_points` exposes ANTs' point mapping itself as that reference.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import InvalidParameterError, NotAvailableError
from ..image.volume import Volume
from ..result import RegistrationResult
from ..transforms.base import Transform
from ..transforms.composite import CompositeTransform

INSTALL_HINT = ("ANTsPy is not installed; it is an optional benchmark peer: "
                "pip install 'deepmultimodalreg[benchmarks]' (or pip install antspyx)")

#: our kind → ANTsPy's type_of_transform
KINDS = {"rigid": "Rigid", "syn": "SyN", "syn-quick": "antsRegistrationSyNQuick[s]"}


def import_ants(threads: int | None = None):
    """``import ants``, after setting ITK's default thread count (read once, when ITK first needs it)."""
    if threads is not None:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(threads))
    try:
        import ants  # noqa: PLC0415
    except ImportError as exc:
        raise NotAvailableError(INSTALL_HINT) from exc
    return ants


def to_ants_image(volume: Volume):
    """An ANTs image with the volume's voxels and LPS geometry (ANTs' numpy axes are (x, y, z))."""
    ants = import_ants()
    g = volume.geometry
    array = np.ascontiguousarray(volume.float().numpy().astype(np.float32).transpose(2, 1, 0))
    return ants.from_numpy(array, origin=tuple(float(v) for v in g.origin),
                           spacing=tuple(float(v) for v in g.spacing),
                           direction=np.asarray(g.direction_matrix, dtype=np.float64))


def from_ants_image(image, name: str = "") -> Volume:
    """A library volume from an ANTs image (inverse of :func:`to_ants_image`)."""
    array = np.ascontiguousarray(image.numpy().transpose(2, 1, 0))
    return Volume.from_numpy(array, spacing=tuple(image.spacing), origin=tuple(image.origin),
                             direction=np.asarray(image.direction).reshape(-1), name=name)


def transform_from_ants_files(fwdtransforms: Sequence[str]) -> Transform:
    """The fixed → moving point map of ANTs' ``fwdtransforms`` as a library transform.

    ANTs lists transforms in *image* order (``antsApplyTransforms -t T1 -t T2``: the moving image is
    resampled by T2 first, then by T1), so the point map of ANTsPy's list ``[T1, T2]`` applies T1
    to the fixed point first: x → T2(T1(x)), i.e. ``CompositeTransform([T2, T1])`` in the
    library's (ITK's) order.  For SyN, ``[1Warp, 0GenericAffine]`` → A(W(x)).
    """
    import SimpleITK as sitk

    from ..transforms.itk_io import displacement_from_image, from_sitk

    parts: list[Transform] = []
    for path in fwdtransforms:
        if str(path).endswith(".mat") or str(path).endswith(".txt") or str(path).endswith(".tfm"):
            parts.append(from_sitk(sitk.ReadTransform(str(path))))
        else:  # a displacement field image (LPS mm vectors on the fixed grid)
            parts.append(displacement_from_image(sitk.ReadImage(str(path), sitk.sitkVectorFloat64)))
    return parts[0] if len(parts) == 1 else CompositeTransform(list(reversed(parts)))


def ants_transform_points(fwdtransforms: Sequence[str], points: torch.Tensor | np.ndarray) -> np.ndarray:
    """ANTs' own mapping of fixed LPS points ``[N, 3]`` by ``fwdtransforms`` (the reference for the conversion)."""
    import pandas as pd

    ants = import_ants()
    pts = np.asarray(points.detach().cpu().numpy() if isinstance(points, torch.Tensor) else points, dtype=np.float64)
    frame = pd.DataFrame(pts.reshape(-1, 3), columns=["x", "y", "z"])
    out = ants.apply_transforms_to_points(3, frame, list(fwdtransforms), whichtoinvert=[False] * len(fwdtransforms))
    return out[["x", "y", "z"]].to_numpy(dtype=np.float64)


def register_ants(fixed: Volume, moving: Volume, kind: str = "rigid", threads: int = 1, seed: int = 0,
                  output_prefix: str | os.PathLike | None = None, **ants_options) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` with ANTsPy; Mattes MI for every stage.

    kind:           ``rigid`` (ANTs ``Rigid``), ``syn`` (``SyN``: affine then SyN, ANTsPy defaults,
                    reg_iterations 40-20-0) or ``syn-quick`` (``antsRegistrationSyNQuick[s]``).
    threads:        ITK threads (effective only if ITK in this process has not started threads yet).
    seed:           ANTs' ``--random-seed`` (the random metric sampling).
    output_prefix:  keep ANTs' transform files there (default: a temporary folder, removed).
    ants_options:   passed to ``ants.registration`` (e.g. ``reg_iterations=(40, 20, 10)``).

    Returns a :class:`RegistrationResult`: ``transform`` is the fixed → moving point map,
    ``warped`` ANTs' warped moving image, ``seconds`` the wall time of the conversion to ANTs, the
    registration and the conversion back; ``figures['fwdtransforms']`` lists the files (only
    meaningful with ``output_prefix``).
    """
    if kind not in KINDS:
        raise InvalidParameterError(f"ANTs registration kind must be one of {', '.join(KINDS)}, got {kind!r}")
    ants = import_ants(threads)
    from ants import config as ants_config  # noqa: PLC0415

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deepmmreg_ants_") as tmp:
        prefix = str(output_prefix) if output_prefix is not None else str(Path(tmp) / "ants_")
        if output_prefix is not None:
            Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        af, am = to_ants_image(fixed), to_ants_image(moving)
        previous_seed = ants_config._random_seed
        ants_config._random_seed = int(seed)
        try:
            out = ants.registration(af, am, type_of_transform=KINDS[kind], outprefix=prefix,
                                    aff_metric="mattes", syn_metric="mattes", verbose=False, **ants_options)
        finally:
            ants_config._random_seed = previous_seed
        fwd = list(out["fwdtransforms"])
        transform = transform_from_ants_files(fwd)
        warped = from_ants_image(out["warpedmovout"], name=f"{moving.name}_warped" if moving.name else "warped")
    seconds = time.perf_counter() - start
    figures = {"type_of_transform": KINDS[kind], "metric": "mattes", "threads": threads, "seed": seed,
               "fwdtransforms": fwd}
    return RegistrationResult(f"ants-{kind}", transform, warped, fixed, moving, figures=figures,
                              device=f"cpu (ANTsPy {getattr(ants, '__version__', '?')})",
                              seconds=seconds)
