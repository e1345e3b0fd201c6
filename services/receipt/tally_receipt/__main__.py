"""`python -m tally_receipt` serves the receipt service; `python -m tally_receipt migrate`
migrates the control database and every merchant database (the Helm pre-upgrade hook runs it)."""

from __future__ import annotations

from tally_kit.server import serve_or_migrate

from tally_receipt.app import build_app, build_directory
from tally_receipt.settings import ReceiptSettings


def main() -> None:
    serve_or_migrate("tally_receipt", __doc__, ReceiptSettings, build_app, build_directory)


if __name__ == "__main__":
    main()
