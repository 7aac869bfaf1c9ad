"""The one exception class of fdbox.

Every failure a caller can see is an :class:`FdboxError` carrying one of the names in
:data:`ERROR_NAMES`. The Varlink front-end turns it into ``io.fdbox.Store.<Name>``, the
D-Bus front-end into ``io.fdbox1.Error.<Name>``, ``fdboxctl`` into an exit code. The
core never raises anything else on purpose; anything else is a bug and is reported as
such, not dressed up as one of these.
"""

from __future__ import annotations

from typing import Any

#: What a caller is told about a bug: never a traceback (callers may be other users).
INTERNAL = "internal error; see the daemon log"

ERROR_NAMES: tuple[str, ...] = (
    "NotFound",
    "AlreadyExists",
    "InvalidName",
    "UnsupportedType",
    "Sealed",
    "NotSealed",
    "PermissionDenied",
    "LimitExceeded",
    "BackendUnavailable",
    "InvalidRequest",
)

#: fdboxctl exit codes: 1 is reserved for "usage / unexpected", each error gets its own.
EXIT_CODES: dict[str, int] = {name: 10 + i for i, name in enumerate(ERROR_NAMES)}


class FdboxError(Exception):
    """A failure with a problem name from :data:`ERROR_NAMES` and a human message.

    ``params`` (keyword-only, so ``name=`` can be an entry name) are extra, machine-readable details (the box, the entry, the limit) that
    the front-ends pass on as error parameters.
    """

    def __init__(self, name: str, message: str = "", /, **params: Any) -> None:
        if name not in ERROR_NAMES:
            raise ValueError(f"unknown fdbox error name {name!r}")
        self.name = name
        self.message = message or name
        self.params = {k: v for k, v in params.items() if v is not None}
        super().__init__(f"{name}: {self.message}")

    def to_params(self) -> dict[str, Any]:
        """Error parameters as sent on the wire: the details plus the message."""
        return {"message": self.message, **self.params}


def describe(exc: BaseException, what: object = "a request") -> tuple[str, dict[str, Any]]:
    """The (error name, parameters) a caller gets for ``exc``, whatever it is.

    An :class:`FdboxError` presents itself. Anything else is a bug in fdboxd: it is
    logged with its traceback here and the caller gets ``BackendUnavailable``.
    """
    if isinstance(exc, FdboxError):
        return exc.name, exc.to_params()
    import logging  # here, not at the top: fdbox-qemu start imports this module on the resume path

    logging.getLogger("fdboxd").error("internal error in %s", what, exc_info=exc)
    return "BackendUnavailable", {"message": INTERNAL}
