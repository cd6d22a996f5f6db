"""User-facing error types.

Every error a user can fix (a typo in a name, a reused run directory, a damaged results file) derives
from :class:`DivlaEvalError`, so the CLI can print one clean line (``divla-eval: error: <message>``) and
exit 2 instead of a traceback, while real bugs still surface as tracebacks.
"""

from __future__ import annotations


class DivlaEvalError(Exception):
    """Base class for errors caused by user input or on-disk state, not by a bug in divla-eval."""


class UnknownNameError(DivlaEvalError):
    """A registry lookup failed; carries the valid names so callers (and tests) need not parse text."""

    def __init__(
        self, kind: str, name: str, valid: list[str], closest: str | None = None, hint: str = ""
    ) -> None:
        self.kind = kind
        self.name = name
        self.valid = list(valid)
        self.closest = closest
        self.hint = hint
        message = f"unknown {kind} {name!r}; valid: {', '.join(self.valid) if self.valid else '(none)'}"
        if closest is not None:
            message += f" (did you mean {closest!r}?)"
        if hint:  # what else the name could be (policies: a 'package.module:factory' path)
            message += f"; {hint}"
        super().__init__(message)

    def __reduce__(self) -> tuple[type, tuple[str, str, list[str], str | None, str]]:
        # Exceptions pickle as cls(*args); spell out our constructor args so the error survives being
        # sent back from a worker process.
        return (type(self), (self.kind, self.name, self.valid, self.closest, self.hint))


class ConfigMismatchError(DivlaEvalError):
    """A run directory is being reused with a different config; resuming would mix incomparable episodes."""


class CorruptFileError(DivlaEvalError):
    """A results file is damaged in a way that cannot be an interrupted write, so we refuse to guess."""


class InvalidValueError(DivlaEvalError, ValueError):
    """A value read from a file (or given as a config override) has the wrong type or shape.

    Also a ValueError, so the handlers that already turn a bad config value into a one-line message
    (`except ValueError`) keep doing so; the readers that know the file prefix its name."""


def raise_if_interrupted(exc: BaseException) -> None:
    """Re-raise as KeyboardInterrupt an exception that an interrupt turned into something else.

    Ctrl-C, or SIGTERM (which the CLI maps to Ctrl-C), raises KeyboardInterrupt from a signal handler
    wherever the interpreter happens to be. When that is inside a C extension call (robosuite's numba
    controller is one, on every step), the extension returns with the exception pending and Python
    raises `SystemError: ... returned a result with an exception set` instead, the KeyboardInterrupt at
    the end of its chain. A per-episode `except Exception` would then record an interrupted episode as a
    failed one (counted against the policy, never rerun on resume) and carry on. Call this first in
    such handlers so the interrupt stops the run as intended."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            raise KeyboardInterrupt from exc
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__


def run_script(main, prog: str) -> None:
    """Run a script's `main()` (scripts/*.py) as the CLI runs a command: an error the user can fix is
    one line on stderr, ``PROG: error: <message>``, and exit status 2, not a traceback."""
    import sys

    try:
        main()
    except DivlaEvalError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
