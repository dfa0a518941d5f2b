"""Results: the run's tables (``schema``), writing and reading them (``store``), ``report.md``
(``report``)."""

from experiments.results.schema import RESULTS_COLUMNS, SAMPLES_COLUMNS, TRACES_COLUMNS
from experiments.results.store import (
    TABLES,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    collect,
    expected_jobs,
    job_dirs,
    load_run,
    save_figure,
    validate_frame,
    write_parquet,
)

__all__ = ["RESULTS_COLUMNS", "SAMPLES_COLUMNS", "TABLES", "TRACES_COLUMNS", "atomic_write",
           "atomic_write_bytes", "atomic_write_text", "collect", "expected_jobs", "job_dirs",
           "load_run", "save_figure", "validate_frame", "write_parquet"]
