"""Names shared by every loopscope package; imports nothing of the project.

``common`` sits below all other packages (``experiments -> halting -> {models, fixedpoint} ->
common``): the one ``Registry`` mechanism and the constants that more than one package uses.
"""

from common.constants import (
    BACKWARDS,
    GRANULARITIES,
    IGNORE_INDEX,
    SPLITS,
    STOP_MODES,
    TOKEN_POLICIES,
)
from common.registry import Registry, call_with_known

__all__ = ["BACKWARDS", "GRANULARITIES", "IGNORE_INDEX", "SPLITS", "STOP_MODES",
           "TOKEN_POLICIES", "Registry", "call_with_known"]
