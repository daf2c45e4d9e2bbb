"""Users and their personal tokens: created, changed, removed, looked up (see the package's
docstring). Each change adds its audit-trail entry in the caller's transaction; the caller
commits."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ays_runtime.audit import trail
from ays_runtime.auth import Caller, write_secret_file
from ays_runtime.exceptions import ConflictError, NotFoundError, ValidationError
from ays_runtime.manager.versions import Actor
from ays_runtime.storage.database import utcnow
from ays_runtime.storage.models import User, UserToken
from ays_runtime.users import passwords
from ays_runtime.vocabulary import AuditAction, ChangeVia, Role

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
GROUP = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TOKEN_PREFIX = "ays_"
PREFIX_CHARS = 12  # "ays_" and 8 random characters: enough to tell tokens apart
# last_used_at is written at most this often per token (not on every request).
LAST_USED_EVERY = timedelta(seconds=60)


@dataclass(frozen=True)
class NewToken:
    """A token just created: `secret` is shown this once and never stored."""

    row: UserToken
    secret: str


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise ValidationError(
            "name", name, "1 to 64 letters, digits, _ . @ -, starting with a letter or digit"
        )
    return name


def check_role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise ValidationError("role", role, ", ".join(r.value for r in Role)) from None


def check_groups(groups: Iterable[str]) -> list[str]:
    out = []
    for group in groups:
        if not isinstance(group, str) or not GROUP.match(group):
            raise ValidationError("groups", group, "node group names ([A-Za-z0-9_-], 1 to 64)")
        if group not in out:
            out.append(group)
    return out


def definition(user: User) -> dict[str, Any]:
    """What the audit trail keeps of a user: never the password (only whether one is set)."""
    return {
        "name": user.name,
        "role": user.role,
        "groups": list(user.groups or []),
        "password_set": bool(user.password_hash),
    }


# --- users ----------------------------------------------------------------------------------


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.name)))


def get_user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFoundError(f"user {name!r} not found")
    return user


def count_users(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(User)) or 0)


def create_user(
    session: Session,
    actor: Actor,
    name: str,
    role: str,
    groups: Iterable[str] = (),
    password: str | None = None,
    source: str = "local",
) -> User:
    now = utcnow()
    user = User(
        name=check_name(name),
        role=check_role(role).value,
        groups=check_groups(groups),
        password_hash=passwords.hash_password(password) if password else "",
        source=source,
        created_at=now,
        updated_at=now,
    )
    session.add(user)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise ConflictError(f"user {name!r} already exists") from None
    trail.record(session, actor, AuditAction.USER_CREATED, name, after=definition(user))
    return user


def update_user(
    session: Session,
    actor: Actor,
    name: str,
    *,
    role: str | None = None,
    groups: Iterable[str] | None = None,
    password: str | None = None,
) -> User:
    user = get_user(session, name)
    before = definition(user)
    if role is not None:
        user.role = check_role(role).value
    if groups is not None:
        user.groups = check_groups(groups)
    if password is not None:
        user.password_hash = passwords.hash_password(password)
    user.updated_at = utcnow()
    after = definition(user)
    if password is not None:
        after["password_changed"] = True
    trail.record(session, actor, AuditAction.USER_UPDATED, name, before=before, after=after)
    return user


def delete_user(session: Session, actor: Actor, name: str) -> None:
    user = get_user(session, name)
    before = definition(user)
    session.execute(delete(UserToken).where(UserToken.user_id == user.id))
    session.delete(user)
    trail.record(session, actor, AuditAction.USER_DELETED, name, before=before)


def verify_login(session: Session, name: str, password: str) -> User | None:
    """The user if `password` is theirs (the time taken does not tell an unknown name)."""
    user = session.scalar(select(User).where(User.name == name)) if NAME.match(name) else None
    if not passwords.verify(user.password_hash if user else "", password):
        return None
    return user


def caller_of(user: User, kind: str) -> Caller:
    return Caller(
        kind,
        user.name,
        role=user.role,
        groups=frozenset(user.groups or ()),
        user_id=user.id,
    )


# --- tokens ---------------------------------------------------------------------------------


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def list_tokens(session: Session, user: User) -> list[UserToken]:
    return list(
        session.scalars(
            select(UserToken).where(UserToken.user_id == user.id).order_by(UserToken.id)
        )
    )


def token_definition(user: User, token: UserToken) -> dict[str, Any]:
    return {"user": user.name, "name": token.name, "prefix": token.prefix}


def create_token(session: Session, actor: Actor, user: User, name: str) -> NewToken:
    if not NAME.match(name):
        raise ValidationError(
            "name", name, "1 to 64 letters, digits, _ . @ -, starting with a letter or digit"
        )
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = UserToken(
        user_id=user.id,
        name=name,
        prefix=secret[:PREFIX_CHARS],
        digest=digest(secret),
        created_at=utcnow(),
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise ConflictError(f"user {user.name!r} already has a token named {name!r}") from None
    what = token_definition(user, row)
    trail.record(session, actor, AuditAction.TOKEN_CREATED, f"{user.name}/{name}", after=what)
    return NewToken(row, secret)


def revoke_token(session: Session, actor: Actor, user: User, token_id: int) -> None:
    row = session.scalar(
        select(UserToken).where(UserToken.id == token_id, UserToken.user_id == user.id)
    )
    if row is None:
        raise NotFoundError(f"user {user.name!r} has no token {token_id}")
    what = token_definition(user, row)
    session.delete(row)
    trail.record(session, actor, AuditAction.TOKEN_REVOKED, f"{user.name}/{row.name}", before=what)


def authenticate_token(session: Session, presented: str) -> Caller | None:
    """The user a personal token belongs to, or None (unknown or revoked); commits its
    `last_used_at` (at most once a minute)."""
    if not presented.startswith(TOKEN_PREFIX):
        return None
    wanted = digest(presented)
    row = session.scalar(select(UserToken).where(UserToken.digest == wanted))
    if row is None or not hmac.compare_digest(row.digest, wanted):
        return None
    user = session.get(User, row.user_id)
    if user is None:
        return None
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_EVERY:
        row.last_used_at = now
        session.commit()
    return caller_of(user, "user")


# --- the dev env's first admin --------------------------------------------------------------

ADMIN_PASSWORD_FILE = "admin_password"
BOOTSTRAP = Actor("manager", ChangeVia.API, "")


def bootstrap_dev_admin(session: Session, data_dir: Path) -> Path | None:
    """In the dev env, when there is no user yet: an admin named `admin` with a generated
    password, written 0600 to `data_dir/admin_password` (the path is logged, never the
    password). Returns the file's path if it made one."""
    if count_users(session):
        return None
    password = secrets.token_urlsafe(18)
    path = data_dir / ADMIN_PASSWORD_FILE
    # Written aside first and put in place only once the user is committed: two managers
    # starting together on one database race here, and the loser's password is no one's.
    aside = path.with_name(f".{ADMIN_PASSWORD_FILE}.{secrets.token_hex(4)}")
    write_secret_file(aside, password)
    try:
        create_user(session, BOOTSTRAP, "admin", Role.ADMIN.value, (), password)
        session.commit()
    except (ConflictError, IntegrityError):
        session.rollback()
        aside.unlink(missing_ok=True)
        return None
    except BaseException:
        aside.unlink(missing_ok=True)
        raise
    aside.replace(path)
    return path
