"""Real components the tests start themselves (object store, proxies, rank launchers)."""
