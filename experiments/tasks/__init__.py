"""Tasks: token data generated from a seed or read from this machine (``experiments.tasks.base``).

One task per module; each registers its class in ``TASKS`` with ``@TASKS.register(name)``, and the
import below is the one line that makes it known. A new task is one new module here, its import
line, and its ``conf/task/<name>.yaml``.
"""

from experiments.tasks import (  # noqa: F401  (registration)
    addition,
    parity,
    parity_vector,
    phop,
    pycode,
    s5,
)
from experiments.tasks.base import (
    IGNORE,
    SPLITS,
    TASKS,
    Batch,
    GeneratedTask,
    Task,
    build_task,
    row_hash_fraction,
)

__all__ = ["IGNORE", "SPLITS", "TASKS", "Batch", "GeneratedTask", "Task", "build_task",
           "row_hash_fraction"]
