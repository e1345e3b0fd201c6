"""`python -m tally_ledger` serves the ledger; `python -m tally_ledger migrate` migrates the
control database and every merchant database (the Helm pre-upgrade hook runs it)."""

from __future__ import annotations

from tally_kit.server import serve_or_migrate

from tally_ledger.app import build_app, build_directory
from tally_ledger.settings import LedgerSettings


def main() -> None:
    serve_or_migrate("tally_ledger", __doc__, LedgerSettings, build_app, build_directory)


if __name__ == "__main__":
    main()
