"""Instance storage chosen by environment: Postgres when DAGSTER_PG_URL is set, else SQLite.

dagster.yaml names this class, so switching the instance to Postgres is one environment variable
and the same dagster.yaml serves a laptop and a shared deployment.
"""

from __future__ import annotations

import os

from dagster._core.storage.base_storage import DagsterStorage
from dagster._serdes import ConfigurableClass, ConfigurableClassData

POSTGRES_URL_ENV = "DAGSTER_PG_URL"


class EnvSelectedStorage(DagsterStorage, ConfigurableClass):
    """Not instantiated: ``from_config_value`` returns the SQLite or Postgres storage itself."""

    @classmethod
    def config_type(cls):
        from dagster import Field, StringSource

        return {"sqlite_base_dir": Field(StringSource, description="Folder of the SQLite storage.")}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value):
        url = os.environ.get(POSTGRES_URL_ENV, "")
        if url:
            from dagster_postgres import DagsterPostgresStorage

            return DagsterPostgresStorage(postgres_url=url, should_autocreate_tables=True, inst_data=inst_data)
        from dagster._core.storage.sqlite_storage import DagsterSqliteStorage

        return DagsterSqliteStorage.from_local(config_value["sqlite_base_dir"], inst_data=inst_data)
