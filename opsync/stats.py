"""How full and how far behind the site buffer is, and when that must refuse writes: one measurement shared by
/metrics, /readyz, backpressure, the CLI and the Airflow UI. The buffer measures itself
(:mod:`opsync.buffer.figures`, which reads its keys); the high-water rule that judges the figures is here.
"""

from opsync.buffer.figures import Fill
from opsync.config import Settings


def high_water(stats: Fill, settings: Settings) -> str | None:
    """Why the buffer must refuse new writes now, or None: backpressure instead of eviction or loss."""
    max_entries, max_memory_fraction = settings.high_water_entries, settings.high_water_memory_fraction
    if stats.depth >= max_entries:
        return f"site buffer holds {stats.depth} unsent transactions (high-water mark {max_entries})"
    fraction = stats.memory_fraction
    if fraction is not None and fraction >= max_memory_fraction:
        return f"site buffer uses {fraction:.0%} of Redis maxmemory (high-water mark {max_memory_fraction:.0%})"
    return None
