"""apex_vllm.metrics: APEX_METRICS_FILE files (one per worker process) read
into a Prometheus registry at scrape time, same-labelled samples summed,
HELP/TYPE kept, a half-written temporary file ignored; and the plugin's
entry point registers the collector in vLLM's registry once."""
import os

from prometheus_client import CollectorRegistry, generate_latest

from apex_vllm import metrics

FILE = """# HELP apex_attention_calls_total Attention calls (ops) run by APEX.
# TYPE apex_attention_calls_total counter
apex_attention_calls_total{engine="libapex"} %d
# HELP apex_kv_blocks_used KV blocks in use per tier (libapex's block pools).
# TYPE apex_kv_blocks_used gauge
apex_kv_blocks_used{engine="libapex",tier="host"} %d
"""


def test_worker_files_summed_into_a_registry(tmp_path):
    (tmp_path / "m-101.prom").write_text(FILE % (10, 3))
    (tmp_path / "m-202.prom").write_text(FILE % (5, 4))
    (tmp_path / "m-303.prom.tmp.303").write_text("garbage {")  # a write in progress
    reg = CollectorRegistry()
    reg.register(metrics.ApexCollector(str(tmp_path / "m-%p.prom")))
    text = generate_latest(reg).decode()
    assert "# TYPE apex_attention_calls_total counter" in text
    assert "# HELP apex_kv_blocks_used KV blocks in use per tier" in text
    assert 'apex_attention_calls_total{engine="libapex"} 15.0' in text
    assert 'apex_kv_blocks_used{engine="libapex",tier="host"} 7.0' in text
    # no file: no APEX metrics, no error
    reg2 = CollectorRegistry()
    reg2.register(metrics.ApexCollector(str(tmp_path / "none-%p.prom")))
    assert "apex_" not in generate_latest(reg2).decode()


def test_entry_point_installs_the_collector_once():
    import apex_vllm
    apex_vllm.register()
    apex_vllm.register()
    assert metrics._COLLECTOR is not None
    assert os.environ.get(metrics.ENV)  # the default, or the user's
    reg = metrics.vllm_registry()
    assert metrics._COLLECTOR in reg._collector_to_names  # registered with vLLM's registry
