"""Airflow integration of pruneflow: operators, DAG-run conf mapping, failure recording.

Importing this package imports neither Airflow nor torch: `conf` is pure Python, and `operators`
imports Airflow (not torch) at module level and the heavy pruneflow stages only inside `execute`.
"""
