"""Console passwords: argon2id hashes (argon2-cffi's `PasswordHasher`, its defaults: the
RFC 9106 low-memory profile). A password is never logged, echoed or stored in clear."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from ays_runtime.exceptions import ValidationError

MIN_LENGTH, MAX_LENGTH = 10, 256
_HASHER = PasswordHasher()
# Verified when a name is unknown, so that an unknown name costs as long as a wrong password.
_DUMMY = _HASHER.hash("not a password of anyone")


def check(password: str) -> str:
    """The password if it is one Ays takes, else a ValidationError (the value never shown)."""
    if not MIN_LENGTH <= len(password) <= MAX_LENGTH:
        raise ValidationError("password", "(hidden)", f"{MIN_LENGTH} to {MAX_LENGTH} characters")
    if not password.isprintable():
        raise ValidationError("password", "(hidden)", "printable characters only")
    return password


def hash_password(password: str) -> str:
    return _HASHER.hash(check(password))


def verify(stored_hash: str, password: str) -> bool:
    """Whether `password` matches `stored_hash` ("" : the user has no password)."""
    if not stored_hash:
        _verify(_DUMMY, password)
        return False
    return _verify(stored_hash, password)


def _verify(stored_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False
