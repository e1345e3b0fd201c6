"""Saved payment tokens encrypted at rest: AES-256-GCM under key ids, so keys rotate.

A sealed token is its key id and `nonce || ciphertext || tag` (a fresh random 96-bit nonce per
seal), kept in two columns. The associated data binds each ciphertext to its row (merchant
and record id, see `binding`): copied into another row, or another merchant's database, it
no longer decrypts.

Rotating keys: list the new key beside the old ones and make it active. New tokens are sealed
under it; rows sealed under an older key still open with theirs (`needs_reseal` finds them
and `reseal` moves them to the active key; the job of `tally_payment_gateway.reseal` moves
every such row in the background); once none is left, the old key can go.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import SecretStr

KEY_BYTES = 32
NONCE_BYTES = 12
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,32}")


@dataclass(frozen=True)
class SealedToken:
    key_id: str
    # nonce || ciphertext || tag
    ciphertext: bytes


class TokenDecryptionError(Exception):
    """A sealed token cannot be opened: its key is gone, or it was altered or moved to another row."""


class TokenVault:
    def __init__(self, keys: Mapping[str, bytes], active_key_id: str) -> None:
        for key_id, key in keys.items():
            if not _KEY_ID.fullmatch(key_id):
                raise ValueError(f"key id {key_id!r} must be 1 to 32 letters, digits, '.', '_' or '-'")
            if len(key) != KEY_BYTES:
                raise ValueError(f"key {key_id!r} must be {KEY_BYTES} bytes (AES-256)")
        if active_key_id not in keys:
            raise ValueError(f"the active key {active_key_id!r} is not among the keys")
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self._active_key_id = active_key_id

    @classmethod
    def from_base64(cls, keys: Mapping[str, SecretStr], active_key_id: str) -> TokenVault:
        """Keys as configured: the base64 of 32 bytes each."""
        decoded: dict[str, bytes] = {}
        for key_id, secret in keys.items():
            try:
                decoded[key_id] = base64.b64decode(secret.get_secret_value(), validate=True)
            except binascii.Error:
                raise ValueError(f"key {key_id!r} is not valid base64") from None
        return cls(decoded, active_key_id)

    @staticmethod
    def generate_key() -> bytes:
        return secrets.token_bytes(KEY_BYTES)

    @staticmethod
    def binding(merchant_id: str, record_id: UUID) -> bytes:
        """The associated data tying a sealed token to one record of one merchant."""
        return f"{merchant_id}/{record_id}".encode()

    @property
    def active_key_id(self) -> str:
        return self._active_key_id

    @property
    def key_ids(self) -> frozenset[str]:
        """Every key it can open tokens with, the active one included."""
        return frozenset(self._ciphers)

    def seal(self, plaintext: str, *, associated_data: bytes) -> SealedToken:
        nonce = secrets.token_bytes(NONCE_BYTES)
        cipher = self._ciphers[self._active_key_id]
        ciphertext = cipher.encrypt(nonce, plaintext.encode(), _aad(self._active_key_id, associated_data))
        return SealedToken(self._active_key_id, nonce + ciphertext)

    def unseal(self, sealed: SealedToken, *, associated_data: bytes) -> str:
        cipher = self._ciphers.get(sealed.key_id)
        if cipher is None:
            raise TokenDecryptionError(f"key {sealed.key_id!r} is no longer configured")
        nonce, ciphertext = sealed.ciphertext[:NONCE_BYTES], sealed.ciphertext[NONCE_BYTES:]
        try:
            plaintext = cipher.decrypt(nonce, ciphertext, _aad(sealed.key_id, associated_data))
        except InvalidTag:
            raise TokenDecryptionError("the sealed token was altered or belongs to another record") from None
        return plaintext.decode()

    def needs_reseal(self, sealed: SealedToken) -> bool:
        return sealed.key_id != self._active_key_id

    def reseal(self, sealed: SealedToken, *, associated_data: bytes) -> SealedToken:
        """The same token sealed under the active key (itself when it already is)."""
        if not self.needs_reseal(sealed):
            return sealed
        return self.seal(
            self.unseal(sealed, associated_data=associated_data), associated_data=associated_data
        )


def _aad(key_id: str, associated_data: bytes) -> bytes:
    # The key id is bound too, so a ciphertext cannot be relabelled under another key id.
    return key_id.encode() + b"\x00" + associated_data
