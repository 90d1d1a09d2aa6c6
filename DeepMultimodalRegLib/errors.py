"""The library's own exception types.

Every error a user can cause (a bad file, a wrong image, an unwritable output) is raised as a
:class:`DeepMMRegError` subclass with a message that says what to do about it, before any heavy
work starts.  The command line turns these into a one-line message and exit code 2; anything else
is a bug and keeps its traceback.
"""


class DeepMMRegError(Exception):
    """Base class of every error the library raises on purpose."""


class ImageReadError(DeepMMRegError):
    """A file or DICOM folder is missing or cannot be read as an image."""


class InvalidImageError(DeepMMRegError):
    """An image was read but cannot be used: wrong dimension, constant, NaN/Inf, bad geometry."""


class TransformFileError(DeepMMRegError):
    """A transform file is missing, unreadable, or of a type that does not fit where it is used."""


class OutputPathError(DeepMMRegError):
    """An output cannot be written there (not writable, or it would overwrite an input)."""


class DeviceError(DeepMMRegError):
    """The requested compute device is not available."""


class NotAvailableError(DeepMMRegError):
    """A method or command that this version does not provide yet."""


class InvalidParameterError(DeepMMRegError):
    """A parameter value is out of range or inconsistent with another one."""


class CancelledError(DeepMMRegError):
    """Long work was cancelled by the user; inputs and earlier results are untouched."""
