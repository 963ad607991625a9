"""Waves: onboarding établissements stage by stage, with gates, a ledger and reports.

``ledger`` (SQLite state), ``plan`` (what will happen), ``steps`` (what onboarding does and the
gates proving it), ``engine`` (apply, resume, rollback), ``report`` and ``timeline`` (outputs).
"""
