"""FastAPI face of opsync: thin routes over the ``opsync`` core."""
