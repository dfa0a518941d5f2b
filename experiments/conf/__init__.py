"""The app's Hydra config module; importing it registers each controller's defaults.

Every controller's defaults live in one place, its class signature: for each registered controller
this stores ``{"name": ..., **defaults}`` (``halting.base.controller_defaults``) as the Hydra node
``controller_defaults/<name>``, and ``controller/<name>.yaml`` pulls it in with its defaults list,
adding only ``name`` and the overrides it documents. So every parameter is a known key (Hydra's
struct mode still catches typos) and no YAML repeats a default.
"""

from hydra.core.config_store import ConfigStore

from halting import CONTROLLERS, controller_defaults


def register_controller_defaults() -> None:
    """Store ``controller_defaults/<name>`` for every registered controller (idempotent)."""
    store = ConfigStore.instance()
    for name in CONTROLLERS:
        store.store(group="controller_defaults", name=name, node=controller_defaults(name))


register_controller_defaults()
