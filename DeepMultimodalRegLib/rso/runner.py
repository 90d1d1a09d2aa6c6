"""``deepmmreg register --method deep``: the general model's forward pass, as a registry runner.

The returned result carries its session (``result.session``) so the caller can save it next to the
result files and ``deepmmreg refine`` can continue from it.
"""

from __future__ import annotations

import warnings

from ..methods.registry import RegistrationOptions, register_method
from .session import DeepRegistrationSession

#: RegistrationOptions.extra keys passed through to the session
SESSION_OPTIONS = ("weights", "similarity", "working_spacing_mm", "smoothness_weight", "learning_rate")


def run_deep(fixed, moving, options: RegistrationOptions):
    settings = {k: options.extra[k] for k in SESSION_OPTIONS if k in options.extra}
    if options.moving_mask is not None:
        warnings.warn("the deep method uses the fixed mask only; the moving mask is ignored", RuntimeWarning,
                      stacklevel=2)
    session = DeepRegistrationSession(fixed, moving, device=options.device, seed=options.seed,
                                      fixed_mask=options.fixed_mask, **settings)
    result = session.general(options.progress, options.cancel)
    result.session = session  # type: ignore[attr-defined]
    return result


register_method("deep", run_deep)
