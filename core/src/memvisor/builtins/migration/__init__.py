"""Live migration in the core: a source and a destination host in one process, pre-copy
rounds driven by dirty bits, stop-and-copy, optional post-copy, and a stream of typed,
checksummed records (:mod:`memvisor.builtins.migration.stream`). docs/migration.md describes it."""

from memvisor.builtins.migration.live import (
    Link,
    LiveMigration,
    MigrationAborted,
    MigrationOptions,
    MigrationResult,
    migrate,
)
from memvisor.builtins.migration.stream import StreamError

__all__ = ["Link", "LiveMigration", "MigrationAborted", "MigrationOptions", "MigrationResult", "StreamError", "migrate"]
