"""Bounded waits in a data-parallel run: a rank whose peers died or hang ends with one line.

A collective returns only when every rank has joined it.  A peer that died, was stopped, or
hangs inside a collective of its own (mlx's ring backend deadlocks on a small share of
`all_sum` calls: ml-explore/mlx#4475) would leave the others waiting forever.  The backends run
every collective under `Watchdog.guard(what)`; a daemon thread ends the process with one line
once a guarded wait has lasted `timeout` seconds.  The engines release the GIL while they wait,
so the thread runs although the main thread is blocked.

The thread also turns SIGTERM into one line: `mlx.launch` and `torchrun` terminate every rank
when one fails.  CPython runs Python signal handlers only in the main thread, between
bytecodes, which never comes while it is blocked in a collective; so the handler is a no-op and
the signal reaches the thread through `signal.set_wakeup_fd`, written by the C-level handler.

Leaving with `os._exit` is safe for the files: everything mlxft writes is written under a
temporary name and renamed (`mlxft.fileio`), so no half-written file is left behind.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import threading
import time

from mlxft.errors import LEAVING, error_line

EXIT_TIMEOUT = 2  # like a UserError: one `Error:` line
EXIT_TERMINATED = 128 + signal.SIGTERM
_POKE = b"\0"  # not a signal number: "the guarded wait changed"


class Watchdog:
    def __init__(self, timeout: float, hint: str = "", exit_process=os._exit):
        self.timeout = timeout
        self.hint = hint  # what is known to hang on this transport
        self.where = "start-up"  # set by the training loop: `step 7`
        self._exit = exit_process
        self._lock = threading.Lock()
        self._what: str | None = None
        self._since = 0.0
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_write.setblocking(False)

    def start(self, signals: bool = True) -> Watchdog:
        """Start the thread; with `signals` (from the main thread) also route SIGTERM to it."""
        if signals and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, frame: None)
            signal.set_wakeup_fd(self._wake_write.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._run, name="mlxft-watchdog", daemon=True).start()
        return self

    @contextlib.contextmanager
    def guard(self, what: str):
        """Bound the wait inside the block (one collective) to `timeout` seconds."""
        with self._lock:
            self._what, self._since = what, time.monotonic()
        self._poke()
        try:
            yield
        finally:
            with self._lock:
                self._what = None

    def _poke(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_write.send(_POKE)

    def _deadline(self) -> float | None:
        with self._lock:
            return self._since + self.timeout if self._what else None

    def _run(self) -> None:
        while True:
            deadline = self._deadline()
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._wake_read], [], [], wait)
            if ready:
                received = self._wake_read.recv(256)
                if bytes([signal.SIGTERM]) in received:
                    return self.die(
                        EXIT_TERMINATED,
                        f"stopped by SIGTERM at {self.where}: the launcher ends every rank when "
                        "one fails (see that rank's error); continue with --resume from the "
                        "last checkpoint",
                    )
                continue
            with self._lock:
                late = self._what and time.monotonic() - self._since >= self.timeout
                what = self._what
            if late:
                hint = f" ({self.hint})" if self.hint else ""
                return self.die(
                    EXIT_TIMEOUT,
                    f"{what} at {self.where} did not finish within distributed_timeout "
                    f"({self.timeout:g} s): another rank died, hangs or is stopped{hint}; "
                    "continue with --resume from the last checkpoint",
                )

    def die(self, code: int, message: str) -> None:
        """One line on stderr, then leave at once (the main thread may be blocked for good).
        When the main thread is already leaving with its own error, say nothing more: wait
        (bounded) for its line, then leave with its status."""
        if not LEAVING.claim("watchdog"):
            LEAVING.said.wait(5.0)
            self._exit(EXIT_TIMEOUT)
            return
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        with contextlib.suppress(Exception):
            sys.stderr.write(error_line(message) + "\n")
            sys.stderr.flush()
        self._exit(code)
