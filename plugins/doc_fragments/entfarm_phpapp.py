"""Documentation of the options every module of ours for a PHP application takes
(module_utils/entfarm_phpapps.COMMON_ARGUMENTS)."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  root:
    description: The application's release directory (its code).
    type: path
    required: true
  php:
    description: PHP CLI binary.
    type: path
    default: /usr/bin/php8.2
  user:
    description: System user running the application; every command runs as this user.
    type: str
    required: true
  environment:
    description: Environment of the commands (libpq's PGSSLMODE, PGSSLROOTCERT …).
    type: dict
    default: {}
"""
