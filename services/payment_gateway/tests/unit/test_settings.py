"""The payment gateway's settings: the account each merchant pays through, and the periodic jobs'
settings read from the environment."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError
from tally_payment_gateway.settings import (
    DEFAULT_ACCOUNT_KEY,
    SIMULATOR_ACCOUNT,
    AuthorizeNetAccount,
    PaymentGatewaySettings,
)

OWN = AuthorizeNetAccount(
    api_login_id="acme-login", transaction_key=SecretStr("tk"), signature_key=SecretStr("sk")
)


def test_by_default_each_merchant_signs_in_to_the_simulator_as_an_account_of_its_own() -> None:
    settings = PaymentGatewaySettings()
    acme, globex = settings.authorize_net_account("acme"), settings.authorize_net_account("globex")
    assert acme is not None and globex is not None
    assert (acme.api_login_id, globex.api_login_id) == ("simulator.acme", "simulator.globex")
    assert acme.transaction_key == SIMULATOR_ACCOUNT.transaction_key
    assert acme.signature_key == SIMULATOR_ACCOUNT.signature_key


def test_a_merchant_s_own_account_comes_first_and_a_default_without_placeholder_is_shared() -> None:
    shared = SIMULATOR_ACCOUNT.model_copy(update={"api_login_id": "shared-login"})
    settings = PaymentGatewaySettings(authorize_net_accounts={"acme": OWN, DEFAULT_ACCOUNT_KEY: shared})
    assert settings.authorize_net_account("acme") == OWN
    assert settings.authorize_net_account("globex") == shared


def test_without_a_default_account_only_merchants_with_their_own_are_served() -> None:
    settings = PaymentGatewaySettings(authorize_net_accounts={"acme": OWN})
    assert settings.authorize_net_account("acme") == OWN
    assert settings.authorize_net_account("globex") is None


def test_the_jobs_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYMENT_GATEWAY_RECONCILIATION_INTERVAL_SECONDS", "12.5")
    monkeypatch.setenv("PAYMENT_GATEWAY_RECONCILIATION_BATCH_SIZE", "7")
    monkeypatch.setenv("PAYMENT_GATEWAY_RESEAL_INTERVAL_SECONDS", "600")
    monkeypatch.setenv("PAYMENT_GATEWAY_RESEAL_BATCH_SIZE", "250")
    settings = PaymentGatewaySettings()
    assert (
        settings.reconciliation_interval_seconds,
        settings.reconciliation_batch_size,
        settings.reseal_interval_seconds,
        settings.reseal_batch_size,
    ) == (12.5, 7, 600.0, 250)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RECONCILIATION_INTERVAL_SECONDS", "0"),
        ("RECONCILIATION_BATCH_SIZE", "0"),
        ("RESEAL_INTERVAL_SECONDS", "-1"),
        ("RESEAL_BATCH_SIZE", "0"),
    ],
)
def test_a_job_that_would_never_run_or_claim_nothing_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(f"PAYMENT_GATEWAY_{name}", value)
    with pytest.raises(ValidationError):
        PaymentGatewaySettings()
