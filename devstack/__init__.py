"""Local stack: create, start and stop every service of a site on one machine (``make up``, tests)."""
