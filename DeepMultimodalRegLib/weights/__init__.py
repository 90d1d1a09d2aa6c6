"""The networks this project ships: a manifest of weights files with SHA-256 and model cards."""

from .manifest import ModelEntry, load_manifest, load_state_dict, verify_weights

__all__ = ["ModelEntry", "load_manifest", "load_state_dict", "verify_weights"]
