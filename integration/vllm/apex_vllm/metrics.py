"""APEX's metrics in vLLM's Prometheus registry (its /metrics endpoint).

vLLM serves /metrics from its API-server process, while APEX's context lives
in the engine-core (worker) process. The worker's libapex already writes
APEX_METRICS_FILE (csrc/metrics.c: Prometheus text, rewritten atomically at
most once a second); this collector, registered in every vLLM process by the
plugin's entry point, reads those files at each scrape and hands their
metrics to vLLM's registry, so names, HELP and TYPE are libapex's own
(apex_attention_calls_total, apex_kv_blocks_used{tier=...}, ...). Several
workers (one file each: "%p" in the path is the process id) are summed.

When APEX_METRICS_FILE is unset, the first vLLM process to load the plugin
sets it to a per-server temporary path, which its workers inherit. Not
covered: vLLM's multiprocess registry (PROMETHEUS_MULTIPROC_DIR, several API
servers), which only aggregates prometheus_client's own metric files."""
import glob
import os
import tempfile

ENV = "APEX_METRICS_FILE"


def default_path() -> str:
    """Sets APEX_METRICS_FILE (for this process and the workers it starts)
    when unset; returns it."""
    if not os.environ.get(ENV):
        d = os.path.join(tempfile.gettempdir(), f"apex-vllm-{os.getpid()}")
        os.makedirs(d, exist_ok=True)
        os.environ[ENV] = os.path.join(d, "metrics-%p.prom")
    return os.environ[ENV]


def read_families(pattern: str):
    """The metric families of every file matching pattern ("%p" matches any
    process id), samples with the same name and labels summed."""
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    merged: dict[str, Metric] = {}
    sums: dict[str, dict] = {}
    for path in sorted(glob.glob(pattern.replace("%p", "*"))):
        if ".tmp." in os.path.basename(path):
            continue  # a write in progress (renamed over the file when done)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError:
            continue  # replaced or removed between glob and open
        for fam in text_string_to_metric_families(text):
            if fam.name not in merged:
                merged[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                sums[fam.name] = {}
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                sums[fam.name][key] = sums[fam.name].get(key, 0.0) + s.value
    for name, fam in merged.items():
        for (sname, labels), value in sums[name].items():
            fam.add_sample(sname, dict(labels), value)
    return list(merged.values())


class ApexCollector:
    """A prometheus_client collector over APEX_METRICS_FILE."""

    def __init__(self, pattern: str):
        self.pattern = pattern

    def collect(self):
        yield from read_families(self.pattern)

    def describe(self):
        return []  # names vary with the engine's files: collected at scrape time


_COLLECTOR = None


def vllm_registry():
    """vLLM's registry: its own accessor when it has one, else
    prometheus_client's default registry (what vLLM's single API server
    serves)."""
    try:
        from vllm.v1.metrics.prometheus import get_prometheus_registry
        return get_prometheus_registry()
    except ImportError:
        from prometheus_client import REGISTRY
        return REGISTRY


def install(registry=None):
    """Registers the collector once per process (idempotent); returns it."""
    global _COLLECTOR
    if _COLLECTOR is None:
        _COLLECTOR = ApexCollector(default_path())
        (registry or vllm_registry()).register(_COLLECTOR)
    return _COLLECTOR
