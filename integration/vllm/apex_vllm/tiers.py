"""Two KV tiers under one vLLM block pool: the configuration, the checks that
decide whether APEX serves a model at all, and the scheduler's counters.

vLLM's pool is device_blocks + host_blocks blocks: ids below device_blocks
live on APEX's device tier (the emulated device here, a GPU elsewhere), the
rest on the host tier (vLLM's own KV tensor). vLLM's scheduler admits against
the whole pool; apex_vllm.scheduler.ApexScheduler has APEX's scheduler
(apex_sched_place, apex_vllm.place) pick each request's tier.

    APEX_VLLM_DEVICE_BLOCKS=N   the device tier, in vLLM blocks (N >= 2:
                                block 0 is vLLM's null block), or
    APEX_VLLM_DEVICE_MB=M       the device tier in MiB of KV (all layers)
    APEX_VLLM_HOST_MAX_SEQS=K   admission: at most K requests on the host
                                tier at once (0: no limit beyond the plan's)
    APEX_VLLM_TIER_STATS=FILE   the scheduler's counters as JSON, rewritten
                                (atomically) when they change

Unset or 0: no device tier, every block on the host tier (APEX's behaviour
before tiers). A configuration APEX cannot serve (unsupported head size or
dtype, a device tier not smaller than the pool, a device that cannot hold
the tier or is absent) gives one warning with the reason, and vLLM runs its
own attention backend (`resolve`).
"""
import json
import os
import tempfile
from dataclasses import dataclass

from vllm.logger import init_logger

logger = init_logger("vllm.apex_vllm")


@dataclass
class TierConfig:
    device_blocks: int = 0     # 0: no device tier
    fallback: str | None = None  # why vLLM's own backend serves instead (None: APEX does)


_RESOLVED: TierConfig | None = None


def _page_bytes(head_size, n_kv_heads, block_size, dtype) -> int:
    import torch
    return 2 * n_kv_heads * block_size * head_size * torch.empty((), dtype=dtype).element_size()


def model_geometry(vllm_config):
    """(layers, q heads, kv heads, head size, dtype, block size) of the model."""
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    return (mc.get_num_layers(pc), mc.get_num_attention_heads(pc), mc.get_num_kv_heads(pc),
            mc.get_head_size(), mc.dtype, vllm_config.cache_config.block_size)


def expected_pool_blocks(vllm_config, page: int, layers: int) -> int | None:
    """The block count vLLM will give its pool, where the config fixes it:
    num_gpu_blocks_override, or an explicit KV size (the CPU platform's
    VLLM_CPU_KVCACHE_SPACE, --kv-cache-memory-bytes) split as
    get_kv_cache_config does for uniform full attention. None: decided by
    profiling; checked again when the context is made."""
    cc = vllm_config.cache_config
    if cc.num_gpu_blocks_override:
        return int(cc.num_gpu_blocks_override)
    if cc.kv_cache_memory_bytes:
        return int(cc.kv_cache_memory_bytes) // (page * layers)
    return None


def requested_device_blocks(page: int, layers: int) -> int:
    blocks = int(os.environ.get("APEX_VLLM_DEVICE_BLOCKS", "0") or 0)
    mb = float(os.environ.get("APEX_VLLM_DEVICE_MB", "0") or 0)
    if blocks == 0 and mb > 0:
        blocks = int(mb * (1 << 20)) // (page * layers)
    return blocks


def _probe_device(geometry, device_blocks) -> str | None:
    """Makes (and closes) a context with the device tier alone: None when the
    device holds it, else why not."""
    from . import ops
    layers, hq, hk, d, dtype, bs = geometry
    try:
        ctx = ops.Context(layers, hq, hk, d, dtype, bs, device_blocks, 1, 1, bs)
    except RuntimeError as e:
        return f"the device cannot hold {device_blocks} blocks: {e}"
    try:
        st = ctx.stats()
        if st["host_mode"]:
            return ("no device (APEX_DEVICE is none, or no GPU answers): a device tier needs "
                    "APEX_DEVICE=emulated or cuda")
        if st["device_blocks"] < device_blocks:  # the device gave what fits
            return (f"the device cannot hold {device_blocks} blocks (it holds "
                    f"{st['device_blocks']}): lower APEX_VLLM_DEVICE_BLOCKS / APEX_VLLM_DEVICE_MB")
    finally:
        ctx.close()
    return None


def check(vllm_config) -> TierConfig:
    """What APEX makes of this model and configuration (no caching)."""
    from . import ops
    layers, hq, hk, d, dtype, bs = geometry = model_geometry(vllm_config)
    lim = ops.limits()
    if d not in lim["head_dims"]:
        return TierConfig(fallback=f"head size {d} is not one APEX supports {lim['head_dims']}")
    if dtype not in ops.DTYPES:
        return TierConfig(fallback=f"dtype {dtype} is not one APEX supports "
                                   f"{sorted(str(t) for t in ops.DTYPES)}")
    if bs not in lim["block_tokens"]:
        return TierConfig(fallback=f"block size {bs} is not one APEX supports "
                                   f"{lim['block_tokens']}")
    page = _page_bytes(d, hk, bs, dtype)
    device = requested_device_blocks(page, layers)
    if device < 0:
        return TierConfig(fallback=f"APEX_VLLM_DEVICE_BLOCKS={device} is negative")
    if device == 0:
        return TierConfig()
    pool = expected_pool_blocks(vllm_config, page, layers)
    if pool is not None and device >= pool:
        return TierConfig(fallback=f"a device tier of {device} blocks is not smaller than "
                                   f"vLLM's pool of {pool} blocks (the host tier would be empty)")
    if device < 2:
        return TierConfig(fallback=f"a device tier of {device} block holds only vLLM's null "
                                   "block (block 0)")
    why = _probe_device(geometry, device)
    if why:
        return TierConfig(fallback=why)
    return TierConfig(device_blocks=device)


def resolve(vllm_config=None) -> TierConfig:
    """check() once per process; a fallback is logged once, with its reason.
    Called by the CPU platform's backend choice and by the scheduler (which
    may run in another process: both derive the same answer from the same
    configuration)."""
    global _RESOLVED
    if _RESOLVED is None:
        if vllm_config is None:
            from vllm.config import get_current_vllm_config_or_none
            vllm_config = get_current_vllm_config_or_none()
        if vllm_config is None or vllm_config.model_config is None:
            return TierConfig()  # no model to check against (not cached)
        _RESOLVED = check(vllm_config)
        if _RESOLVED.fallback:
            logger.warning("APEX: not used, vLLM's own attention backend runs instead: %s",
                           _RESOLVED.fallback)
        elif _RESOLVED.device_blocks:
            logger.info("APEX: device tier of %d blocks (ids [0, %d)), host tier the rest of "
                        "vLLM's pool", _RESOLVED.device_blocks, _RESOLVED.device_blocks)
    return _RESOLVED


def reset_for_tests():
    global _RESOLVED
    _RESOLVED = None


DEVICE, HOST = "device", "host"


# -------------------------------------------------------------------- stats

def new_stats() -> dict:
    return {"decisions": 0, "decided": {"step": 0, "admit": 0, "outgrown": 0},
            "admitted": {DEVICE: 0, HOST: 0}, "waits": {"plan": 0, "host_cap": 0},
            "promotions": 0, "spills": 0, "moves_waiting": 0, "blocks_copied": 0,
            "remapped_to_worker": 0, "steps": 0, "strategies": {},
            "max_running": {DEVICE: 0, HOST: 0}, "device_blocks": 0, "pool_blocks": 0,
            "migrations": "off"}


def write_stats(stats: dict) -> None:
    path = os.environ.get("APEX_VLLM_TIER_STATS")
    if not path:
        return
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp.", dir=d)
    with os.fdopen(fd, "w") as f:
        json.dump(stats, f)
    os.replace(tmp, path)


def cdiv(a: int, b: int) -> int:
    return -(-a // b) if b else 0

