"""Named failpoints for crash tests.

`failpoint("relay.after_publish")` kills the process with SIGKILL, with no cleanup at all,
when the comma-separated environment variable `TALLY_FAILPOINTS` names it, so tests can
prove what survives a crash at that exact point. The variable is read once at import;
in production it is unset and a failpoint costs one set lookup.
"""

from __future__ import annotations

import os
import signal
import sys

ENVIRONMENT_VARIABLE = "TALLY_FAILPOINTS"

_armed: frozenset[str] = frozenset(
    name.strip() for name in os.environ.get(ENVIRONMENT_VARIABLE, "").split(",") if name.strip()
)


def failpoint(name: str) -> None:
    if name in _armed:
        sys.stderr.write(f"failpoint {name}: killing process {os.getpid()}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
