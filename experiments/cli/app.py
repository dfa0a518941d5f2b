"""The ``loopscope`` command (and ``python -m experiments``): the Hydra app around ``run``.

``main()`` is thin: it checks the command line and the composed config up front
(``experiments.cli.preflight``: Hydra's own errors — an unknown group option such as
``controller=pondr``, an unknown key — and ``experiments.config.validate`` for every job of a
sweep) and turns any problem into one line on stderr with exit status 2, then hands over to the
``@hydra.main`` function, which calls ``experiments.study.run`` and turns its failures into one
line and an exit status (in a sweep: a failed job's summary, so the other jobs go on).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import hydra
from omegaconf import DictConfig

import experiments.conf  # noqa: F401  (registers the code's defaults with Hydra)
from experiments.cli.preflight import preflight
from experiments.config.validate import ConfigError
from experiments.errors import FAILED_EXIT, USAGE_EXIT, LoopscopeError, fail
from experiments.study import hydra_job_num, run


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> dict[str, Any] | None:
    from experiments.train import TrainingFailed

    multirun = hydra_job_num() is not None
    try:
        return run(cfg)
    except ConfigError as err:
        if multirun:
            raise
        fail("loopscope", str(err))
    except LoopscopeError as err:  # e.g. a corrupt or mismatched checkpoint in the run directory
        print(f"loopscope: error: {err}", file=sys.stderr)
        if multirun:  # keep the other jobs of the sweep going
            return {"status": "failed", "message": str(err)}
        sys.exit(USAGE_EXIT)
    except TrainingFailed as err:
        print(f"loopscope: {err}", file=sys.stderr)
        if multirun:  # keep the other jobs of the sweep going; status.json records it
            return {"status": "failed", "step": err.step, "message": str(err)}
        sys.exit(FAILED_EXIT)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``loopscope`` (and ``python -m experiments``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    error = preflight(args)
    if error:
        fail("loopscope", error)
    sys.argv = [sys.argv[0] if sys.argv else "loopscope", *args]
    _hydra_main()


if __name__ == "__main__":
    main()
