"""Alembic environment: the URL and metadata come from the app, not from alembic.ini."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine

from idemhook._config.settings import normalise_database_url
from idemhook._store.models import Base

config = context.config
target_metadata = Base.metadata


def _engine():
    # `idemhook db upgrade` hands over the app's engine; plain `alembic` reads DATABASE_URL.
    engine = config.attributes.get("engine")
    if engine is not None:
        return engine
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("DATABASE_URL")
    if not url:
        raise RuntimeError("set DATABASE_URL (or run `idemhook db upgrade`)")
    return create_engine(normalise_database_url(url))


def run_migrations_offline() -> None:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("DATABASE_URL", "")
    context.configure(
        url=str(normalise_database_url(url)),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    with _engine().connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            # SQLite cannot ALTER most things in place; batch mode rebuilds tables.
            render_as_batch=connection.dialect.name == "sqlite",
            transactional_ddl=True,
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
