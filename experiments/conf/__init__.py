"""Hydra config package; importing it registers the code's defaults with Hydra's ConfigStore.

* the typed settings of ``train``/``eval``/``study`` (``experiments.config.store``);
* each controller's defaults, which live in one place, its class signature: for each registered
  controller this stores ``{"name": ..., **defaults}`` (``halting.base.controller_defaults``) as
  the Hydra node ``controller_defaults/<name>``, and ``controller/<name>.yaml`` pulls it in with its
  defaults list, adding only ``name`` and the overrides it documents. So every parameter is a known
  key (Hydra's struct mode still catches typos) and no YAML repeats a default.

Hydra imports this package when it composes from ``pkg://experiments.conf``; the app imports it
too, so the defaults are in the ConfigStore whichever way the config is found.
"""

from hydra.core.config_store import ConfigStore

from experiments.config.store import register
from halting import CONTROLLERS
from halting.base import controller_defaults


def register_controller_defaults() -> None:
    """Store ``controller_defaults/<name>`` for every registered controller (idempotent)."""
    store = ConfigStore.instance()
    for name in CONTROLLERS:
        store.store(group="controller_defaults", name=name, node=controller_defaults(name))


register()
register_controller_defaults()
