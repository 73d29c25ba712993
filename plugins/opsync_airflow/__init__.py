"""Airflow side of opsync: hooks, operators, sensors, triggers and maintenance tasks.

An installed package (not only a file in the plugins folder) so that the triggerer can import
the triggers.
"""
