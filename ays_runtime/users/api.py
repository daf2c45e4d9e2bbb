"""The users API: /api/v1/users (admin), /api/v1/me and /api/v1/me/tokens (any user).

    GET    /api/v1/users                         every user (never a password or token)
    POST   /api/v1/users                         201 {name, role, groups, password?}
    GET    /api/v1/users/{name}
    PATCH  /api/v1/users/{name}                  any of role, groups, password
    DELETE /api/v1/users/{name}                  204; their tokens go with them
    POST   /api/v1/users/{name}/unlock           end their sign-in lock-out (users/lockout.py)
    GET    /api/v1/users/{name}/tokens           prefix, name, created, last used
    POST   /api/v1/users/{name}/tokens           201 {name}: the token, shown this once
    DELETE /api/v1/users/{name}/tokens/{id}      204: refused from the next request on
    GET    /api/v1/me                            who the caller is
    GET    /api/v1/me/tokens, POST, DELETE /{id} the caller's own tokens

Who may call what is decided by `ays_runtime.users.access` before these run.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from ays_runtime.audit.api import Who
from ays_runtime.auth import Caller
from ays_runtime.exceptions import NotFoundError
from ays_runtime.manager.schemas import ErrorOut
from ays_runtime.storage.database import in_session, utcnow
from ays_runtime.storage.models import User, UserToken
from ays_runtime.users import lockout, service
from ays_runtime.vocabulary import Role
from ays_runtime.web.fields import Id, StorableText, UtcOut

T = TypeVar("T")


class UserIn(StorableText):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64, description="letters, digits, _ . @ -")
    role: Role
    groups: list[str] = Field(
        default_factory=list, max_length=1000, description="node groups an operator may change"
    )
    password: str | None = Field(None, description="for the console; 10 to 256 characters")


class UserChange(StorableText):
    model_config = ConfigDict(extra="forbid")
    role: Role | None = None
    groups: list[str] | None = Field(None, max_length=1000)
    password: str | None = None


class UserOut(BaseModel):
    name: str
    role: Role
    groups: list[str]
    password_set: bool
    locked_until: UtcOut | None = Field(
        None,
        description="when the user's console sign-in lock-out ends (too many wrong "
        "passwords; `POST /users/{name}/unlock` ends it now); null: none is on",
    )
    created_at: UtcOut
    updated_at: UtcOut


class Unlocked(BaseModel):
    name: str
    was_locked_until: UtcOut | None = Field(
        description="when the lock-out this call ended would have ended; null: none was on"
    )
    failures_cleared: int = Field(description="the failed sign-ins counted, now forgotten")


class UserList(BaseModel):
    items: list[UserOut]


class TokenIn(StorableText):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64, description="what it is for, e.g. ci or laptop")


class TokenOut(BaseModel):
    id: int
    name: str
    prefix: str = Field(description="the token's first characters, to tell it apart")
    created_at: UtcOut
    last_used_at: UtcOut | None


class TokenCreated(TokenOut):
    token: str = Field(description="the token: shown this once, stored only hashed")


class TokenList(BaseModel):
    items: list[TokenOut]


class Me(BaseModel):
    name: str
    kind: str = Field(description="user (personal token), session, access_token (env token)")
    role: str
    groups: list[str]


_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorOut, "description": "bad or missing access token"},
    403: {"model": ErrorOut, "description": "the caller's role does not allow it"},
    404: {"model": ErrorOut},
    409: {"model": ErrorOut},
    422: {"model": ErrorOut, "description": "a field has a bad value (named in the body)"},
    503: {"model": ErrorOut, "description": "the database could not be reached"},
}
router = APIRouter(tags=["users"], responses=_ERRORS)


def _caller(request: Request) -> Caller:
    caller: Caller = request.state.caller
    return caller


Me_ = Annotated[Caller, Depends(_caller)]


async def _in_session(request: Request, work: Callable[[Session], T]) -> T:
    """`work(session)` in the thread pool, committed; tried again on a transient error."""
    sessions = request.app.state.ays.sessions
    return await run_in_threadpool(
        in_session, sessions, work, "manager: the users API", commit=True
    )


def user_out(user: User, locked_until: datetime | None = None) -> UserOut:
    return UserOut(
        name=user.name,
        role=Role(user.role),
        groups=list(user.groups or []),
        password_set=bool(user.password_hash),
        locked_until=locked_until,
        created_at=user.created_at,
        updated_at=user.updated_at,
    )


def _user_with_lockout(s: Session, user: User) -> UserOut:
    """One user as the API shows it, with their console lock-out if there is one now."""
    return user_out(user, lockout.locked_out(s, [user.name]).get(user.name))


def token_out(row: UserToken) -> TokenOut:
    return TokenOut(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
    )


def _created(new: service.NewToken) -> TokenCreated:
    return TokenCreated(**token_out(new.row).model_dump(), token=new.secret)


# --- users (admin) --------------------------------------------------------------------------


@router.get("/users", response_model=UserList)
async def list_users(request: Request) -> UserList:
    def work(s: Session) -> UserList:
        users = service.list_users(s)
        locked = lockout.locked_out(s, [u.name for u in users])
        return UserList(items=[user_out(u, locked.get(u.name)) for u in users])

    return await _in_session(request, work)


@router.post("/users", response_model=UserOut, status_code=201)
async def create_user(body: UserIn, request: Request, who: Who) -> UserOut:
    def work(s: Session) -> UserOut:
        user = service.create_user(s, who, body.name, body.role, body.groups, body.password)
        return user_out(user)

    return await _in_session(request, work)


@router.get("/users/{name}", response_model=UserOut)
async def get_user(name: str, request: Request) -> UserOut:
    def work(s: Session) -> UserOut:
        user = service.get_user(s, name)
        return _user_with_lockout(s, user)

    return await _in_session(request, work)


@router.patch("/users/{name}", response_model=UserOut)
async def update_user(name: str, body: UserChange, request: Request, who: Who) -> UserOut:
    def work(s: Session) -> UserOut:
        user = service.update_user(
            s, who, name, role=body.role, groups=body.groups, password=body.password
        )
        return _user_with_lockout(s, user)

    return await _in_session(request, work)


@router.delete("/users/{name}", status_code=204)
async def delete_user(name: str, request: Request, who: Who) -> Response:
    await _in_session(request, lambda s: service.delete_user(s, who, name))
    return Response(status_code=204)


@router.post("/users/{name}/unlock", response_model=Unlocked)
async def unlock_user(name: str, request: Request, who: Who) -> Unlocked:
    """End the user's console sign-in lock-out and forget their failed sign-ins."""

    def work(s: Session) -> Unlocked:
        service.get_user(s, name)
        row = lockout.unlock(s, who, name)
        if row is None:
            return Unlocked(name=name, was_locked_until=None, failures_cleared=0)
        until = row.locked_until if row.locked_until and row.locked_until > utcnow() else None
        return Unlocked(name=name, was_locked_until=until, failures_cleared=row.failures)

    return await _in_session(request, work)


@router.get("/users/{name}/tokens", response_model=TokenList)
async def user_tokens(name: str, request: Request) -> TokenList:
    def work(s: Session) -> TokenList:
        user = service.get_user(s, name)
        return TokenList(items=[token_out(t) for t in service.list_tokens(s, user)])

    return await _in_session(request, work)


@router.post("/users/{name}/tokens", response_model=TokenCreated, status_code=201)
async def create_user_token(name: str, body: TokenIn, request: Request, who: Who) -> TokenCreated:
    def work(s: Session) -> TokenCreated:
        return _created(service.create_token(s, who, service.get_user(s, name), body.name))

    return await _in_session(request, work)


@router.delete("/users/{name}/tokens/{token_id:int}", status_code=204)
async def revoke_user_token(name: str, token_id: Id, request: Request, who: Who) -> Response:
    def work(s: Session) -> None:
        service.revoke_token(s, who, service.get_user(s, name), token_id)

    await _in_session(request, work)
    return Response(status_code=204)


# --- the caller's own -----------------------------------------------------------------------


def _own_user(session: Session, caller: Caller) -> User:
    user = session.get(User, caller.user_id) if caller.user_id is not None else None
    if user is None:
        raise NotFoundError(
            f"{caller.name} is not a user (the env's access token has no tokens of its own); "
            "create a user with POST /api/v1/users or `aysManager user add`"
        )
    return user


@router.get("/me", response_model=Me)
async def me(caller: Me_) -> Me:
    return Me(name=caller.name, kind=caller.kind, role=caller.role, groups=sorted(caller.groups))


@router.get("/me/tokens", response_model=TokenList)
async def my_tokens(request: Request, caller: Me_) -> TokenList:
    def work(s: Session) -> TokenList:
        user = _own_user(s, caller)
        return TokenList(items=[token_out(t) for t in service.list_tokens(s, user)])

    return await _in_session(request, work)


@router.post("/me/tokens", response_model=TokenCreated, status_code=201)
async def create_my_token(body: TokenIn, request: Request, caller: Me_, who: Who) -> TokenCreated:
    def work(s: Session) -> TokenCreated:
        return _created(service.create_token(s, who, _own_user(s, caller), body.name))

    return await _in_session(request, work)


@router.delete("/me/tokens/{token_id:int}", status_code=204)
async def revoke_my_token(token_id: Id, request: Request, caller: Me_, who: Who) -> Response:
    def work(s: Session) -> None:
        service.revoke_token(s, who, _own_user(s, caller), token_id)

    await _in_session(request, work)
    return Response(status_code=204)
