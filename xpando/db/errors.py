"""Which database errors a retry cannot fix, and how an activity says so.

A write the database refuses for what it holds fails the same way on every attempt, so an
activity that retried it would retry until the end of time (and its workflow would wait as long).
:func:`fail_fast` turns such an error into a non-retryable ``ApplicationError`` typed after it;
every other error (a lost connection, a timeout, a lock or serialization conflict, a server
restarting) leaves unchanged, for the activity's retry policy.

=======================================================  ========================  =========
what happened                                            ``type``                  retried
=======================================================  ========================  =========
text no encoding can carry (NUL on PostgreSQL, a lone    ``InvalidText``           no
surrogate anywhere): SQLSTATE 22021/22P05,
``UnicodeError``, a payload pydantic cannot encode
any other data exception (SQLSTATE class 22: too long,   ``DataRefused``           no
out of range), an int no column type holds, a value a
column type's bind processor refuses, any other payload
pydantic cannot serialize
a constraint (not null, foreign key, check: SQLSTATE     ``ConstraintViolation``   no
class 23, SQLite ``SQLITE_CONSTRAINT_*``)
a unique or primary key violation                        (unchanged)               yes
anything else                                            (unchanged)               yes
=======================================================  ========================  =========

A unique violation is the one constraint a retry can fix: xpando's writes are upserts or
look-then-insert on a business key, so it means a concurrent writer stored the same row first,
and the retry takes the idempotent path.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pydantic_core import PydanticSerializationError
from sqlalchemy.exc import DBAPIError, StatementError
from temporalio.exceptions import ApplicationError

from xpando.contracts import INVALID_TEXT_TYPE, UNSAFE_TEXT
from xpando.logs import get_logger

log = get_logger(__name__)

DATA_REFUSED = "DataRefused"
CONSTRAINT_VIOLATION = "ConstraintViolation"
REFUSAL_TYPES = (INVALID_TEXT_TYPE, DATA_REFUSED, CONSTRAINT_VIOLATION)

# PostgreSQL: character not in repertoire (e.g. NUL), untranslatable character.
_TEXT_STATES = frozenset({"22021", "22P05"})
_UNIQUE_STATE = "23505"
_SQLITE_DUPLICATE = frozenset({"SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"})
_SQLITE_DATA = frozenset({"SQLITE_TOOBIG", "SQLITE_MISMATCH", "SQLITE_RANGE"})
REASON_CHARS = 300


@dataclass(frozen=True)
class Refusal:
    """An error no retry can fix: its ``type`` (above) and a one-line reason without the SQL or
    its parameters (which may hold a whole prompt)."""

    type: str
    reason: str


def classify(err: BaseException) -> Refusal | None:
    """What ``err`` is if no retry can fix it, else None (retry)."""
    links = list(_chain(err))
    kind = _kind(err, links)
    # The reason comes from the root cause: the driver's or server's own message, without the
    # statement and parameters that SQLAlchemy's message adds.
    return Refusal(kind, _reason(links[-1])) if kind is not None else None


def _kind(err: BaseException, links: list[BaseException]) -> str | None:
    for link in links:
        if isinstance(link, UnicodeError):
            return INVALID_TEXT_TYPE
        if isinstance(link, PydanticSerializationError):  # a payload that cannot be sent
            return INVALID_TEXT_TYPE if "UnicodeEncodeError" in str(link) else DATA_REFUSED
    for link in links:
        state = getattr(link, "sqlstate", None)
        if isinstance(state, str) and len(state) == 5:
            if state in _TEXT_STATES:
                return INVALID_TEXT_TYPE
            if state.startswith("22"):
                return DATA_REFUSED
            if state.startswith("23") and state != _UNIQUE_STATE:
                return CONSTRAINT_VIOLATION
            return None  # the server said what happened, and it is none of the above
        if isinstance(link, sqlite3.Error):
            name = getattr(link, "sqlite_errorname", "") or ""
            if name.startswith("SQLITE_CONSTRAINT") and name not in _SQLITE_DUPLICATE:
                return CONSTRAINT_VIOLATION
            return DATA_REFUSED if name in _SQLITE_DATA else None
        if isinstance(link, OverflowError):  # an int wider than any column type (both drivers)
            return DATA_REFUSED
    if (
        isinstance(err, StatementError)
        and not isinstance(err, DBAPIError)
        and isinstance(err.orig, ValueError | TypeError)
    ):
        return DATA_REFUSED  # a column type's bind processor refused the value
    return None


@contextmanager
def fail_fast(step: str) -> Iterator[None]:
    """Run a database step: an error no retry can fix leaves as a non-retryable
    ``ApplicationError`` (``type`` from the table above, message ``"<step>: <reason>"``); any
    other error, and an ``ApplicationError`` raised inside, leaves as it is."""
    try:
        yield
    except ApplicationError:
        raise
    except Exception as err:
        found = classify(err)
        if found is None:
            raise
        log.warning("database refused a write", step=step, type=found.type, reason=found.reason)
        raise ApplicationError(
            f"{step}: {found.reason}", type=found.type, non_retryable=True
        ) from err


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err``, then what it wraps: SQLAlchemy's ``orig``, then causes and contexts."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        link = todo.pop(0)
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        yield link
        orig = getattr(link, "orig", None)
        todo += [
            orig if isinstance(orig, BaseException) else None,
            link.__cause__,
            None if link.__suppress_context__ else link.__context__,
        ]


def _reason(err: BaseException) -> str:
    """The error's own message (a server's primary message, without the DETAIL that may quote
    the row), on one line, with escapes for unsafe characters, and short."""
    message = getattr(err, "message", None)
    text = message if isinstance(message, str) and message else str(err)
    text = " ".join((text or type(err).__name__).split())
    text = UNSAFE_TEXT.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    if len(text) > REASON_CHARS:
        text = text[: REASON_CHARS - 1] + "…"
    return f"{type(err).__name__}: {text}"
