"""Password hashing with argon2id (``argon2-cffi``, its RFC 9106 parameters).

Only the hash is stored. A hash made with older parameters is re-made at the next
successful sign-in (:func:`needs_rehash`).
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_LENGTH = 12
MAX_LENGTH = 1024  # hashing a megabyte "password" is a denial of service, not a password

_HASHER = PasswordHasher()
_DUMMY_HASH = _HASHER.hash("not a password of anybody")


def password_problem(password: str) -> str | None:
    """Why a new password is refused, or None (length only: NIST SP 800-63B 5.1.1.2)."""
    if len(password) < MIN_LENGTH:
        return f"a password needs at least {MIN_LENGTH} characters"
    if len(password) > MAX_LENGTH:
        return f"a password has at most {MAX_LENGTH} characters"
    return None


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Whether ``password`` matches; without a hash (no such account, or one without a local
    password) a dummy hash is checked, so the answer takes as long either way."""
    if len(password) > MAX_LENGTH:
        return False
    try:
        return _HASHER.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    return _HASHER.check_needs_rehash(password_hash)
