"""Registration methods, looked up by their command-line names (see :mod:`.registry`)."""

from .registry import METHODS, MethodInfo, available_methods, get_method, register_method

__all__ = ["METHODS", "MethodInfo", "available_methods", "get_method", "register_method"]
