"""The PSP simulator's accounts opened per merchant (its books, no HTTP): the login names the
merchant, the webhook URL gets the merchant in its place, the transaction key is checked."""

from __future__ import annotations

import pytest
from psp_simulator.bank import Account, AccountFamily, Bank

FAMILY = AccountFamily(
    login="simulator.{merchant}",
    transaction_key="family-key",
    signature_key="SIGNATURE",
    webhook_url="http://127.0.0.1:8080/v1/webhooks/authorize-net/{merchant}",
)


def test_a_merchant_signs_in_as_its_own_account_with_its_own_webhook_url() -> None:
    bank = Bank(accounts={}, family=FAMILY)
    acme = bank.authenticate("simulator.acme", "family-key")
    assert acme == Account(
        login="simulator.acme",
        transaction_key="family-key",
        signature_key="SIGNATURE",
        webhook_url="http://127.0.0.1:8080/v1/webhooks/authorize-net/acme",
    )
    # Opened once: the same account, and its books, the next time.
    assert bank.authenticate("simulator.acme", "family-key") is acme
    globex = bank.authenticate("simulator.globex", "family-key")
    assert (
        globex is not None and globex.webhook_url == "http://127.0.0.1:8080/v1/webhooks/authorize-net/globex"
    )
    assert set(bank.accounts) == {"simulator.acme", "simulator.globex"}


@pytest.mark.parametrize(
    ("login", "key"),
    [
        ("simulator.acme", "wrong-key"),
        ("simulator.", "family-key"),
        ("simulator", "family-key"),
        ("other.acme", "family-key"),
        ("simulator.acme/../admin", "family-key"),
    ],
)
def test_a_wrong_key_or_a_login_outside_the_family_opens_nothing(login: str, key: str) -> None:
    bank = Bank(accounts={}, family=FAMILY)
    assert bank.authenticate(login, key) is None
    assert bank.accounts == {}


def test_without_a_webhook_url_the_merchants_accounts_send_no_notifications() -> None:
    bank = Bank(accounts={}, family=AccountFamily("simulator.{merchant}", "family-key", "SIGNATURE"))
    acme = bank.authenticate("simulator.acme", "family-key")
    assert acme is not None and acme.webhook_url is None


def test_accounts_added_by_name_are_found_as_before() -> None:
    own = Account(login="t-123", transaction_key="k", signature_key="S", webhook_url=None)
    bank = Bank(accounts={"t-123": own}, family=FAMILY)
    assert bank.authenticate("t-123", "k") is own
    assert bank.authenticate("t-123", "family-key") is None


def test_a_family_login_must_name_the_merchant_once() -> None:
    with pytest.raises(ValueError):
        AccountFamily("simulator", "family-key", "SIGNATURE")
