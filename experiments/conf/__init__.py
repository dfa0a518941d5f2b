"""Hydra config package; importing it registers the code's defaults (``experiments.config.store``).

Hydra imports this package when it composes from ``pkg://experiments.conf``; the app imports it
too, so the defaults are in the ConfigStore whichever way the config is found.
"""

from experiments.config.store import register

register()
