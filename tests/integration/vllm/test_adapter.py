"""The adapter against the installed vLLM's own classes: its plugin loader and
backend registry, its CPU platform's backend choice, its metadata types; and
APEX's forward on CPU tensors (host mode) against a causal-attention
reference, over several engine steps that mix prefill chunks and decodes,
with the KV in vLLM's own per-layer tensors (allocated and bound by vLLM's
allocate_kv_cache and forward context) or, where those cannot serve, in
APEX's own pool."""
import contextlib
import importlib.metadata
import types

import pytest
import torch

from vllm.config import ModelConfig, VllmConfig
from vllm.forward_context import create_forward_context, override_forward_context
from vllm.platforms.cpu import CpuPlatform
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.attention.selector import AttentionSelectorConfig
from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts
from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.worker.utils import allocate_kv_cache, copy_kv_cache_blocks_inplace

import apex_vllm
from apex_vllm import backend as apex_backend


def test_entry_point_registers_custom_backend():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert "apex_vllm:register" in {ep.value for ep in eps}
    from vllm.plugins import load_general_plugins
    load_general_plugins()
    load_general_plugins()  # idempotent
    assert AttentionBackendEnum.CUSTOM.get_path() == apex_vllm.BACKEND_PATH
    assert AttentionBackendEnum.CUSTOM.get_class() is apex_backend.ApexAttentionBackend
    assert apex_backend.ApexAttentionBackend.get_name() == "CUSTOM"


def test_cpu_platform_chooses_apex_only_when_asked():
    apex_vllm.register()
    cfg = AttentionSelectorConfig(head_size=64, dtype=torch.float32, kv_cache_dtype="auto",
                                  block_size=16)
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, cfg) == \
        apex_vllm.BACKEND_PATH
    cpu = AttentionBackendEnum.CPU_ATTN.get_path()
    assert CpuPlatform.get_attn_backend_cls(None, cfg) == cpu
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CPU_ATTN, cfg) == cpu
    b = apex_backend.ApexAttentionBackend
    assert b.supports_head_size(64) and not b.supports_head_size(72)
    assert b.supports_dtype(torch.bfloat16) and b.supports_kv_cache_dtype("auto")
    assert not b.supports_kv_cache_dtype("fp8")


def test_backend_declares_layer_outer_layouts():
    layouts = get_supported_kv_cache_layouts([apex_backend.ApexAttentionBackend])
    assert layouts == [KVCacheLayout.LBHNC, KVCacheLayout.LBNHC]
    assert all(l.is_layer_compact and not l.is_block_outermost for l in layouts)


HQ, HK, D, BS, NBLK, LAYERS = 6, 2, 64, 16, 64, 2
PAGE = 2 * HK * BS * D * 4  # one block of one layer, fp32: vLLM's page = APEX's block


class Engine:
    """Plays vLLM's part for a few steps: block tables, slot mapping, and the
    K/V history that the reference attends over. layout: vLLM allocates and
    binds the KV tensors as its worker does (allocate_kv_cache with that
    layout, the layers' kv_cache in the forward context); None: plain
    tensors and no forward context."""

    def __init__(self, model_dir, monkeypatch, layout=None):
        monkeypatch.setattr(apex_backend, "RUNTIME", apex_backend._Runtime())
        vcfg = VllmConfig(model_config=ModelConfig(model=model_dir, dtype="float32",
                                                   max_model_len=256))
        spec = FullAttentionSpec(block_size=BS, num_kv_heads=HK, head_size=D,
                                 dtype=torch.float32)
        self.names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
        b = apex_backend.ApexAttentionBackend
        self.builder = b.get_builder_cls()(spec, self.names, vcfg, torch.device("cpu"))
        self.impl = b.get_impl_cls()(num_heads=HQ, head_size=D, scale=D ** -0.5,
                                     num_kv_heads=HK, alibi_slopes=None, sliding_window=None,
                                     kv_cache_dtype="auto")
        self.fwd = None
        if layout is None:
            self.kv = {n: torch.zeros(NBLK, HK, BS, 2 * D) for n in self.names}
        else:
            vcfg.cache_config.kv_cache_layout = layout.name
            vcfg.cache_config.num_gpu_blocks_override = NBLK
            kcfg = get_kv_cache_config_from_groups(vcfg, [KVCacheGroupSpec(self.names, spec)],
                                                   1 << 30)
            assert kcfg.num_blocks == NBLK
            self.kv = allocate_kv_cache(kcfg, torch.device("cpu"), layout)
            vcfg.compilation_config.static_forward_context.update(
                {n: types.SimpleNamespace(kv_cache=self.kv[n]) for n in self.names})
            self.fwd = create_forward_context(None, vcfg)
        perm = torch.randperm(NBLK, generator=torch.Generator().manual_seed(1))
        self.free = perm.tolist()
        self.tables, self.hist = {}, {}  # seq -> block ids; (layer, seq) -> (k, v)

    def step(self, work, gen):
        """work: [(seq, n_new_tokens)]; runs every layer, returns max error."""
        qsl, lens, slots = [0], [], []
        for s, n in work:
            table = self.tables.setdefault(s, [])
            start = self.hist.get((0, s), (torch.empty(0, HK, D),))[0].shape[0]
            while len(table) * BS < start + n:
                table.append(self.free.pop())
            slots += [table[p // BS] * BS + p % BS for p in range(start, start + n)]
            qsl.append(qsl[-1] + n)
            lens.append(start + n)
        width = max(len(self.tables[s]) for s, _ in work) + 1
        bt = torch.zeros(len(work), width, dtype=torch.int32)
        for i, (s, _) in enumerate(work):
            bt[i, :len(self.tables[s])] = torch.tensor(self.tables[s], dtype=torch.int32)
        qsl_t = torch.tensor(qsl, dtype=torch.int32)
        cm = CommonAttentionMetadata(
            query_start_loc=qsl_t, query_start_loc_cpu=qsl_t,
            seq_lens=torch.tensor(lens, dtype=torch.int32), num_reqs=len(work),
            num_actual_tokens=qsl[-1], max_query_len=max(n for _, n in work),
            max_seq_len=max(lens), block_table_tensor=bt,
            slot_mapping=torch.tensor(slots, dtype=torch.int64))
        md = self.builder.build(0, cm)
        T = qsl[-1]
        worst = 0.0
        for li, name in enumerate(self.names):
            # q|k|v as one fused projection, as the model produces it
            qkv = torch.randn(T, (HQ + 2 * HK) * D, generator=gen)
            q = qkv[:, :HQ * D].view(T, HQ, D)
            k = qkv[:, HQ * D:(HQ + HK) * D].view(T, HK, D)
            v = qkv[:, (HQ + HK) * D:].view(T, HK, D)
            out = torch.full((T, HQ, D), float("nan"))
            layer = types.SimpleNamespace(layer_name=name)
            with (override_forward_context(self.fwd) if self.fwd
                  else contextlib.nullcontext()):
                self.impl.forward(layer, q, k, v, self.kv[name], md, out)
            for i, (s, n) in enumerate(work):
                pk, pv = self.hist.get((li, s), (torch.empty(0, HK, D), torch.empty(0, HK, D)))
                rows = slice(qsl[i], qsl[i + 1])
                ak, av = torch.cat([pk, k[rows]]), torch.cat([pv, v[rows]])
                self.hist[(li, s)] = (ak, av)
                L = ak.shape[0]
                mask = torch.ones(n, L, dtype=torch.bool).tril(L - n)
                ref = torch.nn.functional.scaled_dot_product_attention(
                    q[rows].transpose(0, 1), ak.repeat_interleave(HQ // HK, 1).transpose(0, 1),
                    av.repeat_interleave(HQ // HK, 1).transpose(0, 1), attn_mask=mask,
                    scale=D ** -0.5).transpose(0, 1)
                worst = max(worst, (ref - out[rows]).abs().max().item())
        return worst


# prompt prefill of two requests, a chunked prefill beside decodes, decodes,
# then a new request joining.
STEPS = [[(0, 5), (1, 40)], [(0, 1), (1, 1), (2, 30)], [(0, 1), (1, 1), (2, 20)],
         [(0, 1), (1, 1), (2, 1)], [(2, 1), (3, 17), (0, 1)]]


@pytest.mark.parametrize("layout", [KVCacheLayout.LBHNC, KVCacheLayout.LBNHC, None,
                                    KVCacheLayout.BLHNC], ids=lambda l: l.name if l else "plain")
def test_forward_matches_causal_reference_over_steps(model_dir, monkeypatch, layout):
    eng = Engine(model_dir, monkeypatch, layout)
    gen = torch.Generator().manual_seed(0)
    for work in STEPS:
        assert eng.step(work, gen) < 1e-5
    rt = apex_backend.RUNTIME
    st = rt.ctx.stats()
    rows = sum(n for w in STEPS for _, n in w)
    assert st["attention_calls"] == LAYERS * len(STEPS)
    assert st["rows_attended_host"] == LAYERS * rows
    assert st["kv_rows_written"] == LAYERS * rows
    assert st["errors"] == 0 and st["host_mode"] == 1 and st["host_blocks"] == NBLK
    if layout in (KVCacheLayout.LBHNC, KVCacheLayout.LBNHC):
        # held once: APEX's host tier is vLLM's tensors, no slab of its own
        assert rt.kv_reason is None
        assert st["host_kv_own_bytes"] == 0
        assert st["host_kv_external_bytes"] == LAYERS * NBLK * PAGE
    else:
        assert st["host_kv_external_bytes"] == 0 and st["host_kv_own_bytes"] >= LAYERS * NBLK * PAGE
        want = "no vLLM forward context" if layout is None else "blocks are not adjacent"
        assert want in rt.kv_reason
    rt.ctx.close()


def block_bytes(t, b):
    """Block b of a per-layer view as vLLM's memory holds it, fp32."""
    flat = torch.as_strided(t, (t.shape[0], PAGE // 4), (t.stride(0), 1), t.storage_offset())
    return flat[b]


def test_kv_lives_in_vllm_tensors(model_dir, monkeypatch):
    """The rows APEX stores are in vLLM's tensor where APEX's block layout
    puts them; vLLM's copy-on-write block copy gives the new block the same
    K/V for APEX; vLLM zeroing a free block changes nothing, zeroing a live
    one changes the result (APEX reads vLLM's memory, nothing else)."""
    eng = Engine(model_dir, monkeypatch, KVCacheLayout.LBHNC)
    gen = torch.Generator().manual_seed(0)
    assert eng.step([(0, 20), (1, 7)], gen) < 1e-5
    for li, name in enumerate(eng.names):
        k, v = eng.hist[(li, 0)]
        for pos in (0, 17, 19):
            blk = block_bytes(eng.kv[name], eng.tables[0][pos // BS])
            panel = blk.view(2, HK, BS, D)
            assert torch.equal(panel[0, :, pos % BS], k[pos])
            assert torch.equal(panel[1, :, pos % BS], v[pos])
    # A partial prefix hit: sequence 2 shares sequence 0's first block through
    # a copy (the worker's copy_kv_cache_blocks_inplace), then goes on.
    cow = eng.free.pop()
    copy_kv_cache_blocks_inplace(list(eng.kv.values()), NBLK, [(eng.tables[0][0], cow)])
    eng.tables[2] = [cow]
    for li in range(LAYERS):
        k, v = eng.hist[(li, 0)]
        eng.hist[(li, 2)] = (k[:BS].clone(), v[:BS].clone())
    assert eng.step([(2, 1)], gen) < 1e-5
    used = {b for t in eng.tables.values() for b in t}
    free = next(b for b in range(NBLK) if b not in used)
    for name in eng.names:  # vLLM's _zero_block_ids: kv[block_id].zero_()
        eng.kv[name][free].zero_()
    assert eng.step([(0, 1), (1, 1)], gen) < 1e-5
    for name in eng.names:
        eng.kv[name][eng.tables[1][0]].zero_()
    assert eng.step([(0, 1), (1, 1)], gen) > 1e-3  # sequence 1 lost its K/V
    apex_backend.RUNTIME.ctx.close()


def test_rebound_kv_tensor_is_refused(model_dir, monkeypatch):
    eng = Engine(model_dir, monkeypatch, KVCacheLayout.LBHNC)
    gen = torch.Generator().manual_seed(0)
    eng.step([(0, 3)], gen)
    eng.kv[eng.names[1]] = eng.kv[eng.names[1]].clone()
    with pytest.raises(RuntimeError, match="rebound layer 1's KV tensor"):
        eng.step([(0, 1)], gen)
    apex_backend.RUNTIME.ctx.close()


def test_bad_block_table_raises_with_apex_message(model_dir, monkeypatch):
    eng = Engine(model_dir, monkeypatch, KVCacheLayout.LBHNC)
    gen = torch.Generator().manual_seed(0)
    eng.step([(0, 3)], gen)
    eng.tables[0][0] = NBLK + 5  # a block id past the pool
    with pytest.raises(RuntimeError, match=r"APEX kv_write: APEX_ERR_OUT_OF_RANGE: .*block id 69 outside \[0, 64\)"):
        eng.step([(0, 1)], gen)
    apex_backend.RUNTIME.ctx.close()


def test_unsupported_features_refused():
    impl = apex_backend.ApexAttentionBackend.get_impl_cls()
    with pytest.raises(NotImplementedError, match="ALiBi"):
        impl(num_heads=4, head_size=64, scale=0.125, num_kv_heads=2, alibi_slopes=[1.0] * 4,
             sliding_window=None, kv_cache_dtype="auto")
    with pytest.raises(NotImplementedError, match="fp8"):
        impl(num_heads=4, head_size=64, scale=0.125, num_kv_heads=2, alibi_slopes=None,
             sliding_window=None, kv_cache_dtype="fp8")
