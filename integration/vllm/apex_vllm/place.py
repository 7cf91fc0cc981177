"""APEX's scheduler in vLLM's engine-core process: apex_sched_place
(apex_paged.h) through ctypes on the libapex that apex_vllm.ops loads.

The KV lives in the worker's context; the scheduler (the engine core, maybe
another process) has none. So it makes its own small one with the model's
geometry: host mode (APEX_DEVICE is ignored: it holds no KV, only the
scheduler's state), one host block, claimed (apex_paged_claim: the plan is
over vLLM's tables, not APEX's sequences). apex_sched_enable gives it the
profile (the CPU part measured once per machine and geometry and cached, the
GPU part from APEX_GPU_PRESET, "host" for the emulated device) with the
model's linear-layer shapes; apex_sched_observe feeds it vLLM's measured step
times. apex_sched_place then answers one tier per request.
"""
import ctypes
import os

from . import ops

DECODING, IDLE, FINISHED = 0, 1, 2  # apex_place_state
TIER_DEVICE, TIER_HOST = 0, 1       # apex_tier
DEVICE_NONE = 1                     # apex_device_kind: host mode


class _Config(ctypes.Structure):  # apex_config (apex.h)
    _fields_ = [("n_layers", ctypes.c_int32), ("n_q_heads", ctypes.c_int32),
                ("n_kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32),
                ("kv_dtype", ctypes.c_int32), ("act_dtype", ctypes.c_int32),
                ("block_tokens", ctypes.c_int32), ("device_blocks", ctypes.c_int64),
                ("host_blocks", ctypes.c_int64), ("max_seqs", ctypes.c_int32),
                ("max_batch", ctypes.c_int32), ("max_seq_len", ctypes.c_int32),
                ("n_threads", ctypes.c_int32), ("cpu_set", ctypes.c_char_p),
                ("device", ctypes.c_int32)]


class _Options(ctypes.Structure):  # apex_sched_options (apex.h)
    _fields_ = [("gpu_preset", ctypes.c_char_p), ("weight_bytes", ctypes.c_int64),
                ("hidden", ctypes.c_int32), ("ffn", ctypes.c_int32), ("vocab", ctypes.c_int32),
                ("tpot_target_ms", ctypes.c_double), ("prefill_budget", ctypes.c_int32)]


class Item(ctypes.Structure):  # apex_place_item (apex_paged.h)
    _fields_ = [("id", ctypes.c_int64), ("len", ctypes.c_int32), ("tier", ctypes.c_int32),
                ("state", ctypes.c_int32)]


class Plan(ctypes.Structure):  # apex_place_plan (apex_paged.h)
    _fields_ = [("strategy", ctypes.c_char_p), ("n_device", ctypes.c_int32),
                ("n_host", ctypes.c_int32), ("n_to_device", ctypes.c_int32),
                ("n_to_host", ctypes.c_int32), ("predicted_step_ms", ctypes.c_double),
                ("n_host_idle", ctypes.c_int32)]


def model_shapes(vllm_config) -> dict:
    """apex_sched_options' linear-layer part from the model's Hugging Face
    config: hidden, ffn, vocab and the weight bytes of a decoder of that shape
    (q/k/v/o, a gated MLP, the embedding; a tied or separate LM head)."""
    mc = vllm_config.model_config
    hf = mc.hf_text_config
    h = int(hf.hidden_size)
    ffn = int(getattr(hf, "intermediate_size", 0) or 4 * h)
    vocab = int(hf.vocab_size)
    pc = vllm_config.parallel_config
    hq, hk, d = mc.get_num_attention_heads(pc), mc.get_num_kv_heads(pc), mc.get_head_size()
    layer = h * (hq + 2 * hk) * d + hq * d * h + 3 * h * ffn
    heads = 1 if getattr(hf, "tie_word_embeddings", False) else 2
    elem = ops.dtype_size(mc.dtype)
    return {"hidden": h, "ffn": ffn, "vocab": vocab,
            "weight_bytes": (mc.get_num_layers(pc) * layer + heads * vocab * h) * elem}


class Placer:
    """apex_sched_place over a claimed host-mode context of the model's
    geometry (n_layers, n_q_heads, n_kv_heads, head_dim, dtype, block_tokens)."""

    def __init__(self, geometry, max_seq_len: int, max_batch: int, shapes: dict):
        ops.load()
        lib = self.lib = ops.libapex()
        lib.apex_context_create.argtypes = [ctypes.POINTER(_Config), ctypes.c_void_p]
        lib.apex_paged_claim.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.apex_context_destroy.argtypes = [ctypes.c_void_p]
        lib.apex_sched_enable.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Options)]
        lib.apex_sched_observe.argtypes = [ctypes.c_void_p, ctypes.c_double]
        lib.apex_sched_place.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(Item),
                                         ctypes.c_int64, ctypes.c_int32,
                                         ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(Plan)]
        layers, hq, hk, d, dtype, bs = geometry
        cfg = _Config()
        # The process's APEX_METRICS_FILE is the worker's context's to write
        # (the first context made takes it, and this one holds no KV): hidden
        # from libapex's environment snapshot while this context is made
        # (apex_config_init retakes the snapshot; the worker's retakes it again).
        metrics_file = os.environ.pop("APEX_METRICS_FILE", None)
        try:
            ops.check(lib.apex_config_init(ctypes.byref(cfg)), "apex_config_init")
            cfg.n_layers, cfg.n_q_heads, cfg.n_kv_heads, cfg.head_dim = layers, hq, hk, d
            cfg.kv_dtype = cfg.act_dtype = ops.DTYPES[dtype]
            cfg.block_tokens, cfg.device_blocks, cfg.host_blocks = bs, 0, 1
            cfg.max_batch, cfg.max_seq_len, cfg.device = max_batch, max_seq_len, DEVICE_NONE
            ctx = ctypes.c_void_p()
            ops.check(lib.apex_context_create(ctypes.byref(cfg), ctypes.byref(ctx)),
                      "apex_context_create (scheduler)")
        finally:
            if metrics_file is not None:
                os.environ["APEX_METRICS_FILE"] = metrics_file
        self.ctx = ctx
        try:
            ops.check(lib.apex_paged_claim(ctx, None), "apex_paged_claim (scheduler)")
            opts = _Options(None, shapes["weight_bytes"], shapes["hidden"], shapes["ffn"],
                            shapes["vocab"], 0.0, 0)
            ops.check(lib.apex_sched_enable(ctx, ctypes.byref(opts)), "apex_sched_enable")
        except RuntimeError:
            self.close()
            raise
        self.calls = 0      # apex_sched_place calls (the scheduler's decisions)
        self.placed = False  # a plan exists for apex_sched_observe to correct

    def place(self, items, device_blocks: int, device_seqs: int = 0):
        """items: (len, tier, state) per request, priority order (the first
        is promoted first and spilled last); tiers TIER_DEVICE / TIER_HOST.
        Returns (the tier of each item, the plan's apex_place_plan)."""
        n = len(items)
        arr = (Item * max(n, 1))(*[Item(i, ln, t, s) for i, (ln, t, s) in enumerate(items)])
        out = (ctypes.c_int32 * max(n, 1))()
        plan = Plan()
        ops.check(self.lib.apex_sched_place(self.ctx, n, arr, device_blocks, device_seqs, out,
                                            ctypes.byref(plan)), "apex_sched_place")
        self.calls += 1
        self.placed = True
        return list(out[:n]), plan

    def observe(self, step_seconds: float) -> None:
        """vLLM's measured time of the step last placed (corrects the model)."""
        if self.placed and 0 < step_seconds <= 3600:
            ops.check(self.lib.apex_sched_observe(self.ctx, step_seconds), "apex_sched_observe")

    def close(self):
        if self.ctx:
            self.lib.apex_context_destroy(self.ctx)
            self.ctx = None
