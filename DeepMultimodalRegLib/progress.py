"""Progress reporting and cancellation for long work.

Every long-running function takes ``progress`` (a callable ``(fraction, message)``, fraction in
[0, 1]) and ``cancel`` (a :class:`CancelToken`).  The CLI shows a tqdm bar; Slicer shows its own
progress bar with a Cancel button that calls :meth:`CancelToken.cancel` from the GUI thread.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

from .errors import CancelledError

ProgressCallback = Callable[[float, str], None]


def no_progress(fraction: float, message: str) -> None:
    """The default progress callback: says nothing."""


class CancelToken:
    """A thread-safe flag that long work polls between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise CancelledError("cancelled by the user; inputs and earlier results are unchanged")


class ProgressScope:
    """Maps the progress of one stage onto a sub-range [start, end] of the whole job."""

    def __init__(self, callback: Optional[ProgressCallback], start: float = 0.0, end: float = 1.0,
                 cancel: Optional[CancelToken] = None) -> None:
        self.callback = callback or no_progress
        self.start, self.end = start, end
        self.cancel = cancel

    def __call__(self, fraction: float, message: str = "") -> None:
        if self.cancel is not None:
            self.cancel.raise_if_cancelled()
        f = min(1.0, max(0.0, fraction))
        self.callback(self.start + (self.end - self.start) * f, message)

    def sub(self, start: float, end: float) -> "ProgressScope":
        """A scope for a stage covering [start, end] of this scope."""
        span = self.end - self.start
        return ProgressScope(self.callback, self.start + span * start, self.start + span * end, self.cancel)


class TqdmProgress:
    """A progress callback drawing a tqdm bar on stderr (used by the command line)."""

    def __init__(self, description: str = "", disable: bool | None = None) -> None:
        from tqdm import tqdm

        # disable=None lets tqdm hide the bar when stderr is not a terminal (CI logs stay clean)
        self._bar = tqdm(total=1000, desc=description, disable=disable, leave=False,
                         bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix} [{elapsed}]")

    def __call__(self, fraction: float, message: str) -> None:
        self._bar.n = int(round(1000 * min(1.0, max(0.0, fraction))))
        self._bar.set_postfix_str(message[:60], refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()
