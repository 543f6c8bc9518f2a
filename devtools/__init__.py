"""Helpers for the tests and the benchmarks alike, outside both: real redis-servers and Sentinels
(redis_server), ``twistd`` processes (twistd), signed webhook deliveries (webhook_support) and the
one-machine deployment under load (deployment), which tests/integration/test_deployment.py and
bench/failover.py both run. Not part of the package: pyproject.toml's package list leaves it out
of the wheel, and it needs the ``[test]`` extras."""
