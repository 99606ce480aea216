"""Stop a process at one step of saving a reference, so that a test can SIGKILL it exactly there.

The steps of :mod:`app.pins` writing a reference are seen from outside, as the
calls it makes on its own temporary file (``.<reference>.<pid>.<hex>.tmp``)::

    after-temp-open   os.fdopen() of the temporary file returned
    after-write       os.fsync() of it is about to run (the PEM is written and flushed)
    after-fsync       os.fsync() of it returned
    after-link        os.link() of it to the reference returned
    before-unlink     os.unlink() of it is about to run

:func:`install` wraps those ``os`` functions in the calling process (a forked
child of a test). As ``sitecustomize`` on the ``PYTHONPATH`` of a gunicorn
started with ``CTBALANCER_TEST_SAVE_PAUSE=<step>``, it does the same in the
master and so in every worker, before anything of the app is imported.
Temporary files of other processes (the stale ones a save removes first)
never stop anything.
"""

from __future__ import annotations

import os
import re
import signal

STEPS = ("after-temp-open", "after-write", "after-fsync", "after-link", "before-unlink")
BEFORE_LINK = STEPS[:3]
AFTER_LINK = STEPS[3:]

_TEMPORARY = re.compile(r"\.[^/]+\.pem\.(\d+)\.[0-9a-f]{8}\.tmp$")


def _own_temporary(path: object) -> bool:
    match = _TEMPORARY.search(os.fspath(path)) if isinstance(path, (str, bytes, os.PathLike)) else None  # type: ignore[arg-type]
    return match is not None and int(match.group(1)) == os.getpid()


def _fd_is_own_temporary(fd: int) -> bool:
    try:
        return _own_temporary(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return False


def _stop() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


def install(step: str) -> None:
    """Make this process stop itself with SIGSTOP at *step* of its next reference save."""
    if step not in STEPS:
        raise ValueError(f"unknown save step {step!r}; expected one of {STEPS}")
    fdopen, fsync, link, unlink = os.fdopen, os.fsync, os.link, os.unlink

    def paused_fdopen(fd, *args, **kwargs):  # type: ignore[no-untyped-def]
        f = fdopen(fd, *args, **kwargs)
        if step == "after-temp-open" and _fd_is_own_temporary(fd):
            _stop()
        return f

    def paused_fsync(fd):  # type: ignore[no-untyped-def]
        own = _fd_is_own_temporary(fd if isinstance(fd, int) else fd.fileno())
        if own and step == "after-write":
            _stop()
        fsync(fd)
        if own and step == "after-fsync":
            _stop()

    def paused_link(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        link(src, dst, *args, **kwargs)
        if step == "after-link" and _own_temporary(src):
            _stop()

    def paused_unlink(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if step == "before-unlink" and _own_temporary(path):
            _stop()
        unlink(path, *args, **kwargs)

    os.fdopen, os.fsync, os.link, os.unlink = paused_fdopen, paused_fsync, paused_link, paused_unlink  # type: ignore[assignment]


if os.environ.get("CTBALANCER_TEST_SAVE_PAUSE"):
    install(os.environ["CTBALANCER_TEST_SAVE_PAUSE"])
