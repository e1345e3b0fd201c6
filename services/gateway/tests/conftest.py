"""Puts the gateway's package folder on sys.path for runs where the editable install does not
(yet) list it in `dev-mode-dirs`; where it does, this adds nothing new."""

from __future__ import annotations

import sys
from pathlib import Path

GATEWAY_SOURCES = str(Path(__file__).resolve().parents[1])
if GATEWAY_SOURCES not in sys.path:
    sys.path.insert(0, GATEWAY_SOURCES)
