"""The ``deepmmreg`` command line (see :mod:`.main`)."""

from .main import main

__all__ = ["main"]
