"""``lc2-rigid``: rigid registration on the volume LC² itself, with a derivative-free optimiser.

This is what DISA replaces: every evaluation warps the moving image and fits a linear model in
every patch (Wein et al. 2008 optimise it with BOBYQA; here Powell's method from SciPy, the same
family of derivative-free local optimisers).  It runs on the same 2 mm preparation, the same
initial pose and the same parametrisation (mm units) as the descriptor methods, so comparisons
differ only in the similarity.  Local search only: a 500-start global search on direct LC² would
take hours, which is the point the DISA paper makes.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from ..device import describe_device, resolve_device
from ..errors import CancelledError, InvalidParameterError
from ..image.validation import validate_registration_input
from ..image.volume import Volume
from ..methods.registry import RegistrationOptions
from ..metrics.lc2 import volume_lc2
from ..progress import ProgressScope
from ..result import RegistrationResult, RegistrationStep
from ..transforms.linear import LinearTransform, RigidTransform
from ..transforms.resample import resample_tensor, warp_volume
from .parametrization import RigidParametrization, nearest_rotation_pose
from .preprocess import DISA_SPACING_MM, prepare_for_disa
from .register import centred_initial_pose

#: patch radius (voxels at 2 mm) and stride of the LC² evaluation: patches every 8 mm, the spacing of
#: the DISA descriptor grid, so both compare the same number of locations
LC2_RADIUS, LC2_STRIDE = 3, 4
#: Powell stopping rules: coordinates in mm, LC² values in [0, 1]
POWELL_XTOL_MM, POWELL_FTOL, POWELL_MAX_EVALUATIONS = 0.05, 1e-5, 800
_KNOWN_EXTRA = {"initial", "fixed_modality", "moving_modality", "max_evaluations"}


def register_lc2_rigid(fixed: Volume, moving: Volume, options: RegistrationOptions) -> RegistrationResult:
    from scipy.optimize import minimize

    validate_registration_input(fixed, "fixed", "lc2-rigid")
    validate_registration_input(moving, "moving", "lc2-rigid")
    if options.search != "local":
        raise InvalidParameterError("lc2-rigid supports --search local only; for a global search use disa-rigid "
                                    "(direct LC² costs ~100× more per evaluation)")
    unknown = set(options.extra) - _KNOWN_EXTRA
    if unknown:
        raise InvalidParameterError(f"unknown option(s) {sorted(unknown)} for lc2-rigid; known: {sorted(_KNOWN_EXTRA)}")
    initial = options.extra.get("initial") or centred_initial_pose(fixed, moving)
    if not isinstance(initial, LinearTransform):
        raise InvalidParameterError("the initial transform must be a linear (rigid or affine) transform")
    if options.fixed_mask is not None or options.moving_mask is not None:
        warnings.warn("lc2-rigid ignores masks (it weights patches by the fixed image's local variance)",
                      RuntimeWarning, stacklevel=2)
    device = resolve_device(options.device)
    scope = ProgressScope(options.progress)
    start = time.perf_counter()
    f = prepare_for_disa(fixed, DISA_SPACING_MM, options.extra.get("fixed_modality")).to(device)
    m = prepare_for_disa(moving, DISA_SPACING_MM, options.extra.get("moving_modality")).to(device)
    background = float(m.data.min())
    prep_s = time.perf_counter() - start
    center = torch.as_tensor(np.asarray(fixed.geometry.center), dtype=torch.float64)
    radius = float(np.linalg.norm(np.asarray(fixed.geometry.extent_mm)) / 4)
    param = RigidParametrization(center, radius)
    limit = int(options.extra.get("max_evaluations", POWELL_MAX_EVALUATIONS))
    count = {"n": 0}

    def similarity(x: np.ndarray) -> float:
        if options.cancel is not None and options.cancel.cancelled:
            raise CancelledError("cancelled by the user; inputs and earlier results are unchanged")
        t = param.transform(torch.as_tensor(x, dtype=torch.float64)[None]).to(device=device)
        with torch.no_grad():
            warped = resample_tensor(m.data[None], m.geometry, t, f.geometry, default_value=background)[0, 0]
            value = float(volume_lc2(f.data, warped, LC2_RADIUS, LC2_STRIDE))
        count["n"] += 1
        scope(min(0.99, count["n"] / limit), f"LC² evaluation {count['n']}: {value:.4f}")
        return value

    x0 = param.initial(initial if isinstance(initial, RigidTransform) else nearest_rotation_pose(initial))[0].numpy()
    before = similarity(x0)
    t0 = time.perf_counter()
    # initial steps of 5 mm (or 5 mm of arc at the lever radius) along each coordinate
    solution = minimize(lambda x: -similarity(x), x0, method="Powell",
                        options={"xtol": POWELL_XTOL_MM, "ftol": POWELL_FTOL, "maxfev": limit,
                                 "direc": np.eye(6) * 5.0})
    search_s = time.perf_counter() - t0
    transform = param.transform(torch.as_tensor(solution.x, dtype=torch.float64)[None]).detach()
    after = -float(solution.fun)
    warped = warp_volume(moving.float(), transform, fixed.geometry)
    figures = {"lc2_similarity_before": before, "lc2_similarity_after": after, "evaluations": count["n"],
               "search": "local", "optimizer": "Powell (SciPy)", "lc2_radius_voxels": LC2_RADIUS,
               "lc2_stride": LC2_STRIDE, "spacing_mm": DISA_SPACING_MM}
    history = [RegistrationStep("prepare", prep_s),
               RegistrationStep("rigid (Powell on LC²)", search_s, int(solution.get("nit", 0)),
                                {"evaluations": count["n"], "message": str(solution.message)[:80]})]
    return RegistrationResult("lc2-rigid", transform, warped, fixed, moving, figures=figures, history=history,
                              device=describe_device(device), seconds=time.perf_counter() - start)
