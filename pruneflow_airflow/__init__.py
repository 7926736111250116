"""Airflow integration of pruneflow: the stage operators and the trigger forms (Params).

Importing this package imports neither Airflow nor torch: `params` builds the forms from the library's
conf keys, and `operators` imports Airflow (not torch) at module level and the pruneflow stages only
inside `execute`.
"""
