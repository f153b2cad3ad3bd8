"""Side-by-side benchmark of the proxy (``python -m tests.bench.proxy_bench``); not a pytest suite."""
