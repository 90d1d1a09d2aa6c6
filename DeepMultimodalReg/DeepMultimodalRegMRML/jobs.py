"""Library work off the GUI thread; results handed back to the GUI thread.

Only the GUI thread may touch MRML.  So a job is split in three: the GUI thread copies what it
needs out of the scene (``volume_from_node``), a worker thread runs the library on those copies,
and the GUI thread applies the result to the scene when it next calls :meth:`BackgroundJob.poll`
(the Widget polls from a Qt timer; scripts and tests call :meth:`BackgroundJob.wait`).  A cancelled
or failed job applies nothing, so the scene stays as it was.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

from DeepMultimodalRegLib.errors import CancelledError
from DeepMultimodalRegLib.progress import CancelToken

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"


class BackgroundJob:
    """Runs ``work(progress, cancel)`` in a thread; ``on_success(result)`` runs on the polling thread.

    ``after`` is a job that must end before this one starts (used when a new refinement replaces
    a cancelled one that is still winding down: both use the same network session).
    """

    def __init__(self, work: Callable[[Callable[[float, str], None], CancelToken], Any],
                 on_success: Optional[Callable[[Any], None]] = None,
                 on_failure: Optional[Callable[[BaseException], None]] = None,
                 name: str = "job", after: Optional["BackgroundJob"] = None) -> None:
        self.name = name
        self.cancel_token = CancelToken()
        self.fraction = 0.0
        self.message = ""
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.started = time.perf_counter()
        self.seconds = 0.0
        self._work, self._on_success, self._on_failure, self._after = work, on_success, on_failure, after
        self._status = RUNNING
        self._delivered = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"DeepMultimodalReg-{name}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- worker thread
    def _progress(self, fraction: float, message: str) -> None:
        self.cancel_token.raise_if_cancelled()
        with self._lock:
            self.fraction, self.message = float(fraction), message

    def _run(self) -> None:
        if self._after is not None:
            self._after.join()
        try:
            self.cancel_token.raise_if_cancelled()
            result = self._work(self._progress, self.cancel_token)
            status = SUCCEEDED
        except CancelledError as error:
            result, status, self.error = None, CANCELLED, error
        except BaseException as error:  # noqa: BLE001 - handed to the GUI thread, which reports it
            result, status, self.error = None, FAILED, error
        with self._lock:
            self.result, self._status = result, status
            self.seconds = time.perf_counter() - self.started
            if status == SUCCEEDED:
                self.fraction = 1.0

    # ---------------------------------------------------------------- any thread
    def cancel(self) -> None:
        self.cancel_token.cancel()

    def join(self, timeout: Optional[float] = None) -> None:
        self._thread.join(timeout)

    @property
    def status(self) -> str:
        with self._lock:
            return self._status

    @property
    def finished(self) -> bool:
        return self.status != RUNNING

    # ---------------------------------------------------------------- GUI thread
    def poll(self) -> str:
        """The job's status; the first call after it ends runs its callback (here, on this thread)."""
        status = self.status
        if status != RUNNING and not self._delivered:
            self._delivered = True
            if status == SUCCEEDED and self._on_success is not None:
                self._on_success(self.result)
            elif status == FAILED and self._on_failure is not None:
                self._on_failure(self.error)
        return status

    def wait(self, timeout: Optional[float] = None) -> str:
        """Block until the job ends, then :meth:`poll` (for scripts, tests and the self-test)."""
        self.join(timeout)
        return self.poll()
