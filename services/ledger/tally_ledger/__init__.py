"""Tally ledger: accounts, credit lots, the append-only ledger, two-phase operations, expiry."""
