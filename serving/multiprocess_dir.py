"""Where the processes of one `recsys serve` keep their Prometheus counts, so that
/metrics sums them. prometheus-client reads the variable when it is first imported, so a
process that counts (a worker, or the parent's sync with object storage) must have it set
before then."""

import os
import tempfile

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"


def fresh_metrics_dir() -> str:
    """A new, empty directory for this service's counts, named in the environment."""
    path = tempfile.mkdtemp(prefix="recsys-metrics-")
    os.environ[MULTIPROCESS_DIR] = path
    return path
