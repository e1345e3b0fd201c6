"""The merchant profiles read from the real catalog: values, cache, unknown merchants, outages."""

from __future__ import annotations

import socket
from decimal import Decimal

import pytest
from tally_kit.errors import NotFound, Unavailable
from tally_kit.events import is_transient
from tally_receipt.catalog_client import CatalogMerchantProfiles
from tally_receipt.domain import PostalAddress, TaxRegime
from tally_receipt.testing import Stack, merchant_config, new_merchant_id

pytestmark = pytest.mark.integration


async def test_a_merchant_s_profile_is_read_from_the_catalog_and_cached(stack: Stack) -> None:
    merchant_id = new_merchant_id("profile")
    config = merchant_config(legal_name="Profile SAS", prefix="PRF")
    config.tax_regime.rate_percent = "8.875"
    config.tax_regime.prices_include_tax = False
    await stack.catalog.create_merchant(merchant_id, config)
    profiles = CatalogMerchantProfiles.open(
        stack.settings.model_copy(update={"merchant_config_ttl_seconds": 60.0})
    )
    try:
        profile = await profiles.profile(merchant_id)
        assert profile.merchant.legal_name == "Profile SAS"
        assert profile.merchant.tax_id == "FR40303265045"
        assert profile.merchant.address == PostalAddress(("1 rue de la Paix",), "Paris", "", "75002", "FR")
        assert profile.merchant.config_revision == 1
        assert profile.series_prefix == "PRF"
        assert profile.tax_regime == TaxRegime(rate_percent=Decimal("8.875"), prices_include_tax=False)

        await stack.catalog.rename_merchant(merchant_id, "Renamed SAS")
        assert (await profiles.profile(merchant_id)).merchant.legal_name == "Profile SAS"
    finally:
        await profiles.close()
    fresh = CatalogMerchantProfiles.open(stack.settings)
    try:
        assert (await fresh.profile(merchant_id)).merchant.legal_name == "Renamed SAS"
    finally:
        await fresh.close()


async def test_a_merchant_the_catalog_does_not_know_is_not_found(stack: Stack) -> None:
    profiles = CatalogMerchantProfiles.open(stack.settings)
    try:
        for merchant_id in (new_merchant_id("nobody"), "Not A Merchant"):
            with pytest.raises(NotFound) as missing:
                await profiles.profile(merchant_id)
            assert missing.value.reason == "MERCHANT_NOT_FOUND"
            assert not is_transient(missing.value)
    finally:
        await profiles.close()


async def test_a_catalog_that_cannot_answer_is_a_transient_failure(stack: Stack) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    settings = stack.settings.model_copy(
        update={"catalog_target": f"127.0.0.1:{closed_port}", "catalog_timeout_seconds": 0.5}
    )
    profiles = CatalogMerchantProfiles.open(settings)
    try:
        with pytest.raises(Unavailable) as down:
            await profiles.profile(new_merchant_id("down"))
        assert down.value.reason == "CATALOG_UNAVAILABLE"
        assert is_transient(down.value)
    finally:
        await profiles.close()
