"""Ansible inventory plugin: the farm described by inventories/<farm>/farm.yml.

Enabled by the project's ansible.cfg, so ``ansible-inventory -i inventories/lab/farm.yml --graph``
works as is, from the command line as from AWX (inventory source "Sourced from a Project").
"""

from __future__ import annotations

import os
import sys

from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin

try:  # ansible-core >= 2.19 tags data from inventory plugins as untrusted by default
    from ansible.template import trust_as_template
except ImportError:  # older ansible-core: inventory data is plain

    def trust_as_template(value):
        return value

try:
    from entfarm.errors import UserError
    from entfarm.inventory import farm_vars, groups, host_vars
    from entfarm.model import load_farm
except ImportError:  # running from a checkout (AWX project) without entfarm installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from entfarm.errors import UserError
    from entfarm.inventory import farm_vars, groups, host_vars
    from entfarm.model import load_farm

DOCUMENTATION = r"""
name: entfarm_farm
short_description: entfarm farm description (farm.yml) as an inventory
description:
  - Reads an entfarm C(farm.yml), validates it and builds one group per service, per
    département (C(departement_<code>)) and per wave (C(wave_<id>)), with the model as variables.
  - The file is recognised by its name, C(farm.yml); no C(plugin:) key is needed.
  - An invalid C(farm.yml) fails with every problem, each with its file, line and YAML path.
options: {}
"""


def _trusted(value):
    """farm.yml is the operator's own file, as trusted as a YAML inventory: without this,
    ansible-inventory --list (used by AWX and testinfra) prints every string wrapped as
    {"__ansible_unsafe": ...}."""
    if isinstance(value, str):
        return trust_as_template(value)
    if isinstance(value, dict):
        return {k: _trusted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_trusted(v) for v in value]
    return value


class InventoryModule(BaseInventoryPlugin):
    NAME = "entfarm_farm"

    def verify_file(self, path):
        return super().verify_file(path) and os.path.basename(path) == "farm.yml"

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path, cache)
        try:
            farm = load_farm(path)
        except UserError as exc:
            raise AnsibleParserError(str(exc)) from None
        for name, value in farm_vars(farm).items():
            self.inventory.set_variable("all", name, _trusted(value))
        for host, variables in host_vars(farm).items():
            self.inventory.add_host(host)
            for name, value in variables.items():
                self.inventory.set_variable(host, name, _trusted(value))
        for group, entry in groups(farm).items():
            self.inventory.add_group(group)
            for host in entry["hosts"]:
                self.inventory.add_host(host, group=group)
            for name, value in entry["vars"].items():
                self.inventory.set_variable(group, name, _trusted(value))
