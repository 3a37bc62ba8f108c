"""Task-scoped tokens: signing keys, JWKS and the minter."""

from sidecar.tokens.keys import KeySet, SigningKey, load_signing_key
from sidecar.tokens.minter import MintedToken, TokenCache, TokenMinter

__all__ = ["KeySet", "MintedToken", "SigningKey", "TokenCache", "TokenMinter", "load_signing_key"]
