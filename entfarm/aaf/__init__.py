"""AAF feeds: read académie exports, check them, import them into the ENT directory, generate them.

Modules: ``export`` (streaming parser and offline checks), ``mapping`` (records to directory
entries, stable logins), ``ldif`` and ``transport`` (reading and writing the directory through the
directory host), ``importer`` (diff, refusals, apply, distribution files), ``generate``
(synthetic exports for tests and benchmarks).
"""
