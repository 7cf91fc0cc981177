"""APEX's vLLM plugin: the `vllm.general_plugins` entry point registers APEX's
attention backend under AttentionBackendEnum.CUSTOM. vLLM uses it only when
asked (`--attention-backend CUSTOM`, or attention_config={"backend": "CUSTOM"});
otherwise vLLM is untouched. APEX's scheduler (two KV tiers, APEX choosing
each request's) is apex_vllm.scheduler.ApexScheduler (`--scheduler-cls`)."""
import os

BACKEND_PATH = "apex_vllm.backend.ApexAttentionBackend"


def _cpu_platform_honours_custom():
    """vLLM's CPU platform returns CPU_ATTN whatever backend was selected; let
    it return the registered CUSTOM backend when (and only when) CUSTOM was
    asked for. Its other choices are unchanged."""
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if getattr(CpuPlatform, "_apex_custom", False):
        return
    original = CpuPlatform.get_attn_backend_cls.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if (selected_backend == AttentionBackendEnum.CUSTOM
                and not attn_selector_config.use_mla and not attn_selector_config.use_sparse):
            # A configuration APEX cannot serve (head size, dtype, a device
            # tier it cannot hold: apex_vllm.tiers) runs vLLM's own backend,
            # with one warning that says why.
            from . import tiers
            if tiers.resolve().fallback is None:
                return AttentionBackendEnum.CUSTOM.get_path()
            selected_backend = None
        return original(cls, selected_backend, attn_selector_config, num_heads)

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    CpuPlatform._apex_custom = True


def register():
    """Entry point (group vllm.general_plugins); idempotent, runs in every
    vLLM process."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    _cpu_platform_honours_custom()
    # APEX's counters and gauges in vLLM's /metrics (apex_vllm/metrics.py).
    from . import metrics
    metrics.install()
    # The scheduler's block copies reach the worker through this file
    # (apex_vllm.copies); set here so that engine and workers inherit it.
    from . import copies
    copies.default_path()
    # Host KV capacity: on vLLM's CPU platform the block pool is sized by
    # VLLM_CPU_KVCACHE_SPACE (GiB); APEX_HOST_KV_GB sets it when it is unset.
    # APEX_TRACE=FILE: vLLM runs several processes, each loading libapex;
    # "%p" (the process id) keeps their timelines apart.
    trace = os.environ.get("APEX_TRACE")
    if trace and "%p" not in trace:
        root, ext = os.path.splitext(trace)
        os.environ["APEX_TRACE"] = root + ".%p" + (ext or ".json")
    gb = os.environ.get("APEX_HOST_KV_GB")
    if gb and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = gb
