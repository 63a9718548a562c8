"""The process around a command: signals, interrupts and resource errors become one line and an exit code.

    MavsrError (bad input, a refused option)   error: <one line>                 exit 2 (or its code)
    SIGINT / SIGTERM (Ctrl-C, a scheduler)     interrupted: finished work kept   exit 130 / 143
    disk full, read-only, no permission        error: <why> writing <file>       exit 2
Every output is written to a temporary name and renamed (fsutil.py), so whatever stops a command
leaves the work finished before it intact, and rerunning the same command resumes.
"""

from __future__ import annotations

import errno
import signal
import sys
import threading

from rich.console import Console

from .errors import MavsrError

err = Console(stderr=True, soft_wrap=True)

_RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
_RESOURCE_MESSAGES = ("No space left on device", "Read-only file system", "Disk quota exceeded")


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop, `kill`, torchrun shutting workers down) as an
    exception: temporary outputs are removed on the way out, finished ones kept. (Not
    KeyboardInterrupt, which Typer turns into a silent exit.)"""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_signalled: int | None = None
# what the interruption line says was kept; a command whose work is not files says its own (serve)
interrupted_note = "finished work is kept; rerun the same command to resume"


def _on_signal(signum, frame):
    global _signalled
    if _signalled is None:  # the first signal interrupts; more of them do not disturb the clean-up
        _signalled = signum
        raise Interrupted(signum)


def run(app) -> None:
    """Run a Typer app as the `mavsr` process."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    try:
        app()
    except SystemExit:
        if _signalled is None:
            raise
        _interrupted(_signalled)
    except BaseException as e:
        _fail(e)


def _fail(e: BaseException) -> None:
    from rich.markup import escape

    if _signalled is not None or isinstance(e, (KeyboardInterrupt, Interrupted)):
        # a signal can surface as another exception when it lands inside a C extension
        _interrupted(_signalled or signal.SIGINT)
    if isinstance(e, MavsrError):
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(e.exit_code)
    if _resource_error(e):
        # disk full, read-only or permission errors met mid-stage: every output is written to a
        # temporary name and renamed, so what was finished before is intact
        why = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
        where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
        err.print(f"[bold red]error:[/] {escape(why)}{escape(where)}; finished work is kept, "
                  "free space or fix permissions and rerun the same command", highlight=False)
        sys.exit(2)
    raise e


def _interrupted(signum: int) -> None:
    sig = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"
    err.print(f"[bold red]interrupted[/] ({sig}): {interrupted_note}")
    sys.exit(143 if sig == "SIGTERM" else 130)


def _resource_error(e: BaseException) -> bool:
    """Disk full / read-only / permission, as an OSError or as the message of a library's own error
    (safetensors and torch.save report a full disk in their own exception types)."""
    if isinstance(e, OSError) and e.errno in _RESOURCE_ERRNOS:
        return True
    return any(m in str(e) for m in _RESOURCE_MESSAGES)
