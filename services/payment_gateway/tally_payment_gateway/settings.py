"""Payment gateway settings: every `ServiceSettings` field, read from `PAYMENT_GATEWAY_*` variables.

The defaults work on a developer machine: the provider is the PSP simulator on port 8090, where
each merchant has an account of its own, and saved tokens are encrypted under a development
key. Production sets `AUTHORIZE_NET_URL`, each merchant's account in `AUTHORIZE_NET_ACCOUNTS`
(without the default entry), and its own encryption keys, all from secrets.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict
from tally_kit.settings import ServiceSettings


class AuthorizeNetAccount(BaseModel):
    """One merchant's Authorize.Net credentials (Account > Settings > API Credentials and Keys)."""

    model_config = ConfigDict(frozen=True)

    api_login_id: str = Field(min_length=1, max_length=25)
    transaction_key: SecretStr
    # Keys the HMAC-SHA512 signature of the account's webhooks.
    signature_key: SecretStr


# In the `api_login_id` of the default entry (see `authorize_net_accounts`), stands for the
# merchant being served: each merchant then signs in as an account of its own.
MERCHANT_PLACEHOLDER = "{merchant}"

# The PSP simulator's accounts, one per merchant (`simulator.<merchant id>`), which the simulator
# opens on first use: each merchant has its own books there, and its own webhook URL.
# Development only.
SIMULATOR_ACCOUNT = AuthorizeNetAccount(
    api_login_id=f"simulator.{MERCHANT_PLACEHOLDER}",
    transaction_key=SecretStr("simulator-transaction-key"),
    signature_key=SecretStr(
        "DA66ECC87BC0D1F9E023789D23C2215537F44F975496F939CEC0035E5B4EBE7A"
        "B0523FFBC38FBD555109C5C150868752A14FF0D5A695EF3424D89538A1A1C0EA"
    ),
)


# The `authorize_net_accounts` entry of merchants without an account of their own.
DEFAULT_ACCOUNT_KEY = "*"


class PaymentGatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PAYMENT_GATEWAY_", extra="ignore", frozen=True)

    service_name: str = "payment_gateway"
    grpc_port: int = 50053
    metrics_port: int = 9103

    # Where Authorize.Net's JSON API is served (`/xml/v1/request.api` below it): the PSP
    # simulator by default; https://apitest.authorize.net (sandbox) or https://api.authorize.net.
    authorize_net_url: str = "http://127.0.0.1:8090"
    # Each merchant's account by merchant id, as JSON: {"acme": {"api_login_id": "...",
    # "transaction_key": "...", "signature_key": "..."}}. The entry "*" serves merchants that
    # have none of their own, as the login it names with MERCHANT_PLACEHOLDER replaced by the
    # merchant id (as it is when it has none); leave it out in production, so that such a
    # merchant is refused (PROVIDER_NOT_CONFIGURED).
    authorize_net_accounts: dict[str, AuthorizeNetAccount] = {DEFAULT_ACCOUNT_KEY: SIMULATOR_ACCOUNT}

    provider_connect_timeout_seconds: float = Field(5.0, gt=0)
    # How long a call may wait for the provider's answer before its outcome is UNKNOWN.
    provider_timeout_seconds: float = Field(30.0, gt=0)
    # Queries (never charges) are tried this many times on outages.
    provider_query_attempts: int = Field(3, ge=1)
    # The provider's circuit opens after this many consecutive outages (timeouts, server
    # errors, refused connections) and stays open this long.
    provider_breaker_failure_threshold: int = Field(5, ge=1)
    provider_breaker_reset_seconds: float = Field(30.0, gt=0)

    # AES-256-GCM keys that encrypt saved payment tokens at rest, by key id, each the base64 of
    # 32 random bytes. New tokens use the active key; rows sealed under an older key keep
    # decrypting as long as its key stays listed.
    token_encryption_keys: dict[str, SecretStr] = {
        "dev-1": SecretStr("g2QuI/JnaC1YGm3EgcpLbXb+7yy2VokUbVKu7UxRuXQ=")
    }
    token_encryption_active_key_id: str = "dev-1"

    # The reconciliation job (`reconciliation`): how often it walks the merchant databases for
    # calls whose outcome is unknown, and how many payments one transaction claims (each costs
    # a query or two to the provider while its row stays locked).
    reconciliation_interval_seconds: float = Field(30.0, gt=0)
    reconciliation_batch_size: int = Field(20, ge=1)
    # The reseal job (`reseal`): how often it walks the merchant databases for tokens sealed
    # under a key other than the active one, and how many it moves to the active key per
    # transaction. Each walk moves every such row, so hourly: within the hour after a rotation,
    # and between rotations a walk finds nothing to do.
    reseal_interval_seconds: float = Field(3600.0, gt=0)
    reseal_batch_size: int = Field(100, ge=1)

    @model_validator(mode="after")
    def _active_key_is_listed(self) -> PaymentGatewaySettings:
        if self.token_encryption_active_key_id not in self.token_encryption_keys:
            raise ValueError("token_encryption_active_key_id must name one of token_encryption_keys")
        return self

    def authorize_net_account(self, merchant_id: str) -> AuthorizeNetAccount | None:
        """The merchant's own account, else the default one ("*") signed in as the merchant,
        else None."""
        own = self.authorize_net_accounts.get(merchant_id)
        if own is not None:
            return own
        default = self.authorize_net_accounts.get(DEFAULT_ACCOUNT_KEY)
        if default is None or MERCHANT_PLACEHOLDER not in default.api_login_id:
            return default
        return default.model_copy(
            update={"api_login_id": default.api_login_id.replace(MERCHANT_PLACEHOLDER, merchant_id)}
        )
