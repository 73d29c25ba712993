"""Development tooling: every service of a site on one machine (``make up``, tests), the WAN proxy, the faults, the soak.

It imports :mod:`opsync`, never the reverse (``tests/test_install.py`` checks): no wheel or image has it.
"""
