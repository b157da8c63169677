from tests.cluster.conftest import dev_cluster  # noqa: F401  (the real cluster, for cluster benchmarks)
