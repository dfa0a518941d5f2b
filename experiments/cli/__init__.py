"""Command lines: ``loopscope`` (the Hydra app, ``app``; its up-front checks and Hydra error
wording, ``preflight``), ``loopscope-plot`` and ``loopscope-diagnose`` (``tools``)."""
