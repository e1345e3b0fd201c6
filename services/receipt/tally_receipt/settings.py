"""Receipt settings: every `ServiceSettings` field plus the receipt's own, from `RECEIPT_*` variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict
from tally_kit.settings import ServiceSettings

# Debian's fonts-dejavu-core: a Unicode font, so that any legal name or address prints as is.
DEJAVU_SANS = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
DEJAVU_SANS_BOLD = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"


class ReceiptSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RECEIPT_", extra="ignore", frozen=True)

    service_name: str = "receipt"
    grpc_port: int = 50056
    metrics_port: int = 9106

    # The catalog's gRPC address, where merchants' legal details and tax regimes are read.
    catalog_target: str = "127.0.0.1:50051"
    catalog_timeout_seconds: float = Field(2.0, gt=0)
    # How long a merchant's configuration read from the catalog is reused before it is read
    # again: a change reaches new documents within this time.
    merchant_config_ttl_seconds: float = Field(60.0, ge=0)

    # Names the event consumer's queue `<name>.events`, its dead-letter exchange `<name>.dlx`
    # and its parking queue `<name>.parking`.
    consumer_name: str = Field("receipt", pattern=r"^[a-z0-9][a-z0-9_-]{0,40}$")
    # Attempts at an event before it is parked. With the consumer's backoff (0.5 s doubling,
    # at most 30 s) ten attempts ride out a catalog outage of about two minutes, the circuit
    # breaker's 30 s pause included; events of a longer one are parked for replay.
    consumer_delivery_limit: int = Field(10, ge=1)

    # TrueType fonts the PDF documents are set in (regular and bold).
    pdf_font_file: str = DEJAVU_SANS
    pdf_bold_font_file: str = DEJAVU_SANS_BOLD
