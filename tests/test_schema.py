"""The ORM schema against the one the migrations build."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from search.storage.schema import Base
from search.storage.store import Store


def test_orm_metadata_matches_migrated_schema(db: Store) -> None:
    # A model change without a migration shows up here as a non-empty diff.
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
