"""Alembic environment of the results DB: pruneflow's tables only, versioned in their own table.

Run through pruneflow.migrations (``pruneflow db upgrade``, ResultsStore's first use, ``pruneflow db
revision``), which passes an open connection in ``config.attributes["connection"]``.
"""

from alembic import context

from pruneflow.migrations import VERSION_TABLE, include_name
from pruneflow.store import Base, make_engine


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,  # Optuna keeps its own `alembic_version` in the same DB
        include_name=include_name,  # never autogenerate against Optuna's (or anyone else's) tables
        render_as_batch=True,  # generated ALTERs work on SQLite too
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:  # a plain `alembic` command line with sqlalchemy.url set
    engine = make_engine(context.config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()
