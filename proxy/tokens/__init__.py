"""Token acquisition (source), storage (cache) and life cycle (manager)."""
