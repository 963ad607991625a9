"""The ENT portal: a small Flask application, CAS client of the farm's CAS server.

Portal hosts install only Flask, gunicorn and markdown-it-py, so nothing in this package may
import the rest of ``entfarm`` (pydantic, Ansible, Docker). Everything the portal knows about the
farm comes from one JSON file rendered from farm.yml (see :mod:`entfarm.portal.config`).
"""
