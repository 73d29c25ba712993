"""How the site is doing: one measurement of every part (:mod:`.status`), the drainer's own figures kept in Redis
(:mod:`.drain_metrics`), the outage forecasts and the replica slot's reserve (:mod:`.capacity`), the alert levels
judged from them (:mod:`.alerts`) and the same rules for Prometheus (:mod:`.alert_rules`).

``opsync status``, ``GET /metrics``, the Airflow page and alerts DAG, and the Datasette dashboard all read these.
"""
