"""Tenants' secrets at rest: ``IDEMHOOK_SECRETS_KEY`` and the authenticated encryption.

A tenant's secret is stored encrypted with Fernet (AES-128-CBC and HMAC-SHA256, from the
``cryptography`` package): a row read or copied without the key tells nothing of the
secret, and a row altered without it fails to decrypt instead of verifying deliveries
with something else. ``IDEMHOOK_SECRETS_KEY`` holds one or more Fernet keys, separated by
commas (MultiFernet): the first encrypts, every one decrypts, so a new key is put first,
``idemhook secrets rekey`` re-encrypts every row with it, and the old one is then dropped.
Neither the keys nor a decrypted secret are ever logged, shown or answered.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from idemhook._values.errors import ConfigError

SETTING = "IDEMHOOK_SECRETS_KEY"
#: How to make a key, as the errors say.
KEYGEN = 'python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'


class SecretBox:
    """Encrypts and decrypts tenants' secrets with the keys of ``IDEMHOOK_SECRETS_KEY``."""

    def __init__(self, keys: list[Fernet]) -> None:
        self._fernet = MultiFernet(keys)
        self.key_count = len(keys)

    def __repr__(self) -> str:  # never the keys
        return f"SecretBox({self.key_count} key(s))"

    def encrypt(self, secret: str) -> bytes:
        """``secret`` encrypted with the first key (a Fernet token)."""
        return self._fernet.encrypt(secret.encode())

    def decrypt(self, token: bytes) -> str:
        """The secret ``token`` holds; :class:`ConfigError` if no key of the setting opens it."""
        try:
            return self._fernet.decrypt(bytes(token)).decode()
        except InvalidToken:
            raise ConfigError(
                f"{SETTING}: none of its keys decrypts a stored tenant secret; put back the key "
                "it was encrypted with (keep old keys after the first until `idemhook secrets "
                "rekey` has run)"
            ) from None

    def rotate(self, token: bytes) -> bytes:
        """``token`` re-encrypted with the first key (``idemhook secrets rekey``)."""
        try:
            return self._fernet.rotate(bytes(token))
        except InvalidToken:
            raise ConfigError(
                f"{SETTING}: none of its keys decrypts a stored tenant secret; put back the key "
                "it was encrypted with, after the new one"
            ) from None


def box_of(setting: str | None, *, needed_by: str = "") -> SecretBox | None:
    """The box for the setting's keys; None when unset, unless ``needed_by`` says who needs it.

    The error names the setting and the position of a malformed key, never its value.
    """
    value = (setting or "").strip()
    if not value:
        if needed_by:
            raise ConfigError(
                f"{SETTING} is not set, and {needed_by} needs it: tenants' secrets are kept "
                f"encrypted with it. Make a key with {KEYGEN} and set {SETTING} to it "
                "(docs/configuration.md#tenants)"
            )
        return None
    keys = []
    parts = value.split(",")
    for position, part in enumerate(parts, start=1):
        try:
            keys.append(Fernet(part.strip().encode()))
        except ValueError:
            where = f"key {position} of {len(parts)}" if len(parts) > 1 else "its key"
            raise ConfigError(
                f"{SETTING}: {where} is not a Fernet key (32 bytes, URL-safe base64, 44 "
                f"characters); make one with {KEYGEN}"
            ) from None
    return SecretBox(keys)
