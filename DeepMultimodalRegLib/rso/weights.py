"""Loading the general model's weights: the shipped ``general`` network (SHA-256 checked, loaded
with ``weights_only=True``), a ``state_dict`` file, a ``state_dict`` mapping, or ``"untrained"``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InvalidParameterError
from ..weights.manifest import WeightsError, load_state_dict
from .model import RegistrationNet

#: name of the shipped general model in weights/manifest.json
GENERAL_MODEL_NAME = "general"


def _as_float32(state: dict) -> dict:
    # the shipped file stores float16 (half the size); the network computes in float32
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def load_general_model(weights=None, device: torch.device | str = "cpu") -> RegistrationNet:
    """The general registration network on ``device``, in eval mode.

    ``weights``: None (the shipped ``general`` network), a path to a ``state_dict`` file, a
    ``state_dict`` mapping, or ``"untrained"`` (a randomly initialised network, seeded by the
    caller: for training from scratch and for tests of the machinery)."""
    model = RegistrationNet()
    if isinstance(weights, str) and weights == "untrained":
        state = None
    elif weights is None:
        try:
            state = load_state_dict(GENERAL_MODEL_NAME)
        except WeightsError as exc:
            raise WeightsError(f"{exc}. The general deep model is not shipped in this installation; "
                               "train one with `deepmmreg train general` and pass its weights file") from None
    elif isinstance(weights, (str, Path)):
        path = Path(weights)
        if not path.is_file():
            raise InvalidParameterError(f"weights file not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a pickle with code, a corrupt file
            raise WeightsError(f"{path} is not a plain state_dict of tensors ({exc.__class__.__name__})") from None
    elif isinstance(weights, dict):
        state = weights
    else:
        raise InvalidParameterError(f"weights must be None, a file path, a state_dict or 'untrained', got {type(weights).__name__}")
    if state is not None:
        if "model" in state and isinstance(state["model"], dict):  # a training checkpoint
            state = state["model"]
        try:
            model.load_state_dict(_as_float32(state))
        except RuntimeError as exc:
            raise WeightsError(f"these weights do not fit the general model (U-Net 16-256): {str(exc)[:200]}") from None
    return model.to(device).eval()
