"""`python -m tally_catalog` serves the catalog; `python -m tally_catalog migrate` migrates
the control database and every merchant database (the Helm pre-upgrade hook runs it)."""

from __future__ import annotations

from tally_kit.server import serve_or_migrate

from tally_catalog.app import build_app, build_directory
from tally_catalog.settings import CatalogSettings


def main() -> None:
    serve_or_migrate("tally_catalog", __doc__, CatalogSettings, build_app, build_directory)


if __name__ == "__main__":
    main()
