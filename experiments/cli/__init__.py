"""Command lines: ``loopscope`` (the Hydra app, ``experiments.study``), ``loopscope-plot`` and
``loopscope-diagnose`` (``experiments.cli.tools``)."""
