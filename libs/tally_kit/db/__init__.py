"""Database access: a database per merchant per service, versioned migrations, bounded pools."""

from tally_kit.db.directory import (
    MERCHANT_ID_PATTERN,
    IsolationLevel,
    MerchantDirectory,
    MerchantPlacement,
    control_database_name,
    is_valid_merchant_id,
    merchant_database_name,
)
from tally_kit.db.migrations import KIT_MIGRATIONS, MigrationError, MigrationSource, apply_migrations

__all__ = [
    "KIT_MIGRATIONS",
    "MERCHANT_ID_PATTERN",
    "IsolationLevel",
    "MerchantDirectory",
    "MerchantPlacement",
    "MigrationError",
    "MigrationSource",
    "apply_migrations",
    "control_database_name",
    "is_valid_merchant_id",
    "merchant_database_name",
]
