"""Field types every route uses, in paths, queries and bodies alike.

    Id         1 .. 2**53-1         an id (task, job log, node)
    Position   0 .. 2**53-1         an offset, a page position, a byte position
    Int32      -2**31 .. 2**31-1    a number stored in an INTEGER column
    UtcIn      an ISO 8601 date-time, with or without an offset (none: UTC): naive UTC inside
    UtcOut     a stored (naive UTC) date-time, sent with its `Z`

Python's int has no bound; SQLite's and MySQL's integers have, and a JSON reader in a browser
holds integers exactly only up to 2**53 (RFC 7493, I-JSON): an integer a route takes is one of
these, so a value beyond them is a 422 naming the field, never an OverflowError deep in a
driver (a test checks every integer of both OpenAPI documents).

`StorableText` is the base of every request body and manager-node message: a string holding
a lone surrogate (JSON allows `"\\ud800"`; no database stores it) is refused naming its field.
Those models are strict besides (`ConfigDict(strict=True)`): a JSON value of the wrong type
(`"5"` for 5, `0` for false) is refused as the OpenAPI document says, not converted; enums
and date-times, which arrive as text, are marked `Strict(False)`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

import annotated_types
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ModelWrapValidatorHandler,
    Strict,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import PydanticCustomError

SAFE_INT_MAX = 2**53 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

# annotated_types, not pydantic.Field: the same type then serves as a path or query parameter.
Id = Annotated[int, annotated_types.Interval(ge=1, le=SAFE_INT_MAX)]
Position = Annotated[int, annotated_types.Interval(ge=0, le=SAFE_INT_MAX)]
Int32 = Annotated[int, annotated_types.Interval(ge=INT32_MIN, le=INT32_MAX)]
NonNegativeInt32 = Annotated[int, annotated_types.Interval(ge=0, le=INT32_MAX)]
_ISO_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")


def _iso_text(value: Any) -> Any:
    """Text that spells a date and a time (pydantic alone would also take 0.5 as a time)."""
    if isinstance(value, datetime) or (isinstance(value, str) and _ISO_DATE_TIME.match(value)):
        return value
    raise ValueError("an ISO 8601 date-time, e.g. 2026-05-01T08:00:00Z")


def _naive_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment
    try:
        return moment.astimezone(UTC).replace(tzinfo=None)
    except OverflowError:  # beyond year 1 or 9999 in UTC: the nearest time there is
        return datetime.min if moment.year < 5000 else datetime.max


def _with_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# Strict(False): request models are strict (no "1" for 1, no 0 for false), but a date-time
# arrives as text in JSON and in a query alike.
UtcIn = Annotated[datetime, Strict(False), BeforeValidator(_iso_text), AfterValidator(_naive_utc)]
UtcOut = Annotated[datetime, AfterValidator(_with_utc)]


def unstorable(data: Any, path: tuple[str | int, ...] = ()) -> tuple[str | int, ...] | None:
    """Where in `data` (dicts, lists, strings) the first string UTF-8 cannot encode is."""
    if isinstance(data, str):
        return None if data.isascii() or _encodes(data) else path
    if isinstance(data, dict):
        for key, value in data.items():
            where = unstorable(key, path) if isinstance(key, str) else None
            where = where or unstorable(value, (*path, str(key)))
            if where is not None:
                return where
    elif isinstance(data, list):
        for i, value in enumerate(data):
            where = unstorable(value, (*path, i))
            if where is not None:
                return where
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class StorableText(BaseModel):
    """Refuses, before any field is looked at, a string (key or value) that is not valid
    Unicode text; the error names where it is."""

    @model_validator(mode="wrap")
    @classmethod
    def _storable(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        where = unstorable(data)
        if where is not None:
            kind = PydanticCustomError(
                "unstorable_text", "holds a lone surrogate (\\ud800-\\udfff): not Unicode text"
            )
            raise PydanticValidationError.from_exception_data(
                cls.__name__, [{"type": kind, "loc": where, "input": "..."}]
            )
        return handler(data)
