"""Around a running pool, for its operators: running it as a daemon (daemon.py), the state it
keeps for them (state.py), ``qless-pool status`` (status.py), Prometheus metrics (metrics.py)."""
