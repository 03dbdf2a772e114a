"""What differs between the two databases the store runs on, SQLite (embedded) and Postgres (shared):
upserts, and reading the keys and values of a JSON column as rows.

Everything else in the repositories is portable SQL; a statement that is not goes here, with both forms.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, String, TableValuedAlias, cast, func, literal_column
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Insert

POSTGRES = "postgresql"
SQLITE = "sqlite"
# json_each's type names for the scalar values the UI offers as filter choices, per database.
_SCALAR_TYPES = {
    SQLITE: ("text", "integer", "real", "true", "false"),
    POSTGRES: ("string", "number", "boolean"),
}


def insert(dialect: str, table: Any) -> Insert:
    """The database's own INSERT construct, which has ``on_conflict_do_update`` (the same API on both)."""
    return (postgresql.insert if dialect == POSTGRES else sqlite.insert)(table)


def upsert(dialect: str, table: Any, key: str, update: list[str]) -> Insert:
    """INSERT ... ON CONFLICT (key) DO UPDATE SET the ``update`` columns, in the database's own syntax."""
    stmt = insert(dialect, table)
    return stmt.on_conflict_do_update(
        index_elements=[getattr(table, key)], set_={name: getattr(stmt.excluded, name) for name in update}
    )


def json_pairs(dialect: str, column: ColumnElement[Any]) -> TableValuedAlias:
    """The top-level (key, value) pairs of a JSON object column as a table function; ``value`` is the JSON value,
    see :func:`json_text` and :func:`json_is_scalar`. Both databases call it json_each, and both decode the keys,
    which a JSON path ('$."key"') would not for keys with quotes or non-ASCII."""
    return func.json_each(column).table_valued("key", "value", *(["type"] if dialect == SQLITE else []))


def json_text(dialect: str, pairs: TableValuedAlias) -> ColumnElement[str]:
    """A pair's value as text: strings unquoted, numbers as written (SQLite gives booleans as 1/0)."""
    if dialect == POSTGRES:
        return pairs.c.value.op("#>>")(literal_column("'{}'"))
    return cast(pairs.c.value, String)


def json_is_scalar(dialect: str, pairs: TableValuedAlias) -> ColumnElement[bool]:
    """True for string, number and boolean values (not null, arrays or objects)."""
    kind = func.json_typeof(pairs.c.value) if dialect == POSTGRES else pairs.c.type
    return kind.in_(_SCALAR_TYPES[dialect])
