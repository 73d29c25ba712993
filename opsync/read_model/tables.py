"""The read model's own tables, beside the domain's (no import of the rest: the registry checks names against them)."""

METRICS = "sync_metrics"
DRAIN_RATE = "sync_drain_rate"
FINDINGS = "sync_findings"
POISON = "sync_poison"
STATE = "publisher_state"
ENGINE_TABLES = (METRICS, DRAIN_RATE, FINDINGS, POISON, STATE)
