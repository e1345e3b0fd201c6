"""Saved tokens sealed with AES-256-GCM: round trip, binding to their row, key rotation."""

from __future__ import annotations

import base64
import dataclasses
from uuid import uuid4

import pytest
from pydantic import SecretStr
from tally_payment_gateway.crypto import SealedToken, TokenDecryptionError, TokenVault
from tally_payment_gateway.settings import PaymentGatewaySettings

TOKEN = "1512345678/1512987654"
OLD_KEY, NEW_KEY = TokenVault.generate_key(), TokenVault.generate_key()
ROW = TokenVault.binding("acme", uuid4())


def test_a_sealed_token_opens_to_itself_and_shows_nothing_of_it() -> None:
    vault = TokenVault({"k1": OLD_KEY}, "k1")
    sealed = vault.seal(TOKEN, associated_data=ROW)
    assert sealed.key_id == "k1"
    assert TOKEN.encode() not in sealed.ciphertext
    assert vault.unseal(sealed, associated_data=ROW) == TOKEN
    # A fresh nonce each time: the same token never seals to the same bytes.
    assert vault.seal(TOKEN, associated_data=ROW).ciphertext != sealed.ciphertext


def test_old_rows_still_open_after_a_rotation_and_move_to_the_new_key() -> None:
    sealed_before = TokenVault({"k1": OLD_KEY}, "k1").seal(TOKEN, associated_data=ROW)
    rotated = TokenVault({"k1": OLD_KEY, "k2": NEW_KEY}, "k2")
    assert rotated.unseal(sealed_before, associated_data=ROW) == TOKEN
    assert rotated.seal(TOKEN, associated_data=ROW).key_id == "k2"
    assert rotated.needs_reseal(sealed_before)
    resealed = rotated.reseal(sealed_before, associated_data=ROW)
    assert resealed.key_id == "k2" and not rotated.needs_reseal(resealed)
    assert rotated.reseal(resealed, associated_data=ROW) is resealed
    # Once the old key is gone, only the rows moved to the new one still open.
    retired = TokenVault({"k2": NEW_KEY}, "k2")
    assert retired.unseal(resealed, associated_data=ROW) == TOKEN
    with pytest.raises(TokenDecryptionError):
        retired.unseal(sealed_before, associated_data=ROW)


def test_a_token_moved_to_another_row_or_merchant_does_not_open() -> None:
    vault = TokenVault({"k1": OLD_KEY}, "k1")
    sealed = vault.seal(TOKEN, associated_data=ROW)
    with pytest.raises(TokenDecryptionError):
        vault.unseal(sealed, associated_data=TokenVault.binding("acme", uuid4()))
    with pytest.raises(TokenDecryptionError):
        vault.unseal(sealed, associated_data=TokenVault.binding("other", uuid4()))


def test_an_altered_or_relabelled_token_does_not_open() -> None:
    vault = TokenVault({"k1": OLD_KEY, "k2": OLD_KEY}, "k1")
    sealed = vault.seal(TOKEN, associated_data=ROW)
    flipped = bytes([sealed.ciphertext[0], sealed.ciphertext[1] ^ 1]) + sealed.ciphertext[2:]
    with pytest.raises(TokenDecryptionError):
        vault.unseal(dataclasses.replace(sealed, ciphertext=flipped), associated_data=ROW)
    with pytest.raises(TokenDecryptionError):
        vault.unseal(SealedToken("k2", sealed.ciphertext), associated_data=ROW)


def test_keys_come_from_settings_as_base64() -> None:
    settings = PaymentGatewaySettings()
    vault = TokenVault.from_base64(settings.token_encryption_keys, settings.token_encryption_active_key_id)
    assert vault.active_key_id == settings.token_encryption_active_key_id
    assert vault.unseal(vault.seal(TOKEN, associated_data=ROW), associated_data=ROW) == TOKEN


@pytest.mark.parametrize(
    ("keys", "active"),
    [
        ({"k1": SecretStr(base64.b64encode(b"short").decode())}, "k1"),
        ({"k1": SecretStr("not base64!")}, "k1"),
        ({"k1": SecretStr(base64.b64encode(OLD_KEY).decode())}, "k2"),
        ({"bad id": SecretStr(base64.b64encode(OLD_KEY).decode())}, "bad id"),
    ],
)
def test_bad_keys_are_refused_at_start_up(keys: dict[str, SecretStr], active: str) -> None:
    with pytest.raises(ValueError):
        TokenVault.from_base64(keys, active)
