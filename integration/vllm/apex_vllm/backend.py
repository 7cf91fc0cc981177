"""APEX as a vLLM v1 attention backend (registered as AttentionBackendEnum.CUSTOM).

Thin by design: the metadata builder passes vLLM's own tensors through, and
the impl's forward makes two calls into C (torch ops from shim/torch): store
this step's K/V rows by vLLM's slot mapping, then causal attention over
vLLM's block tables. APEX runs every FLOP of attention over one APEX block
per vLLM block id. The KV is held once: APEX's host tier is vLLM's own
per-layer KV tensors (apex_paged_context_create), whose block b is bytes
[b * page, (b + 1) * page) of the layer, page = APEX's block. Where vLLM's
tensors cannot serve (CUDA tensors, another layout), APEX keeps its own host
pool and says once why.
"""
import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.v1.attention.backend import (AttentionBackend, AttentionImpl, AttentionLayer,
                                       AttentionMetadataBuilder, AttentionType,
                                       CommonAttentionMetadata)

from vllm.logger import init_logger

from . import copies, ops

try:  # vLLM >= 0.32: the physical layout a backend's kernels accept
    from vllm.v1.kv_cache_layout import KVCacheLayout
except ImportError:  # older vLLM: get_kv_cache_shape instead; not matched here
    KVCacheLayout = None

logger = init_logger("vllm.apex_vllm")  # under "vllm": vLLM's log handlers and level apply



def vllm_layer_kv_tensors(names):
    """vLLM's KV tensor of each named layer, as bind_kv_cache left it on the
    Attention modules (the forward context's no_compile_layers, which is the
    compilation config's static_forward_context), or (None, why)."""
    try:
        from vllm.forward_context import get_forward_context, is_forward_context_available
    except ImportError:
        return None, "this vLLM has no forward context"
    if not is_forward_context_available():
        return None, "no vLLM forward context at the first forward"
    layers = get_forward_context().no_compile_layers
    tensors = []
    for name in names:
        t = getattr(layers.get(name), "kv_cache", None)
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return None, f"layer {name} has no KV tensor bound"
        tensors.append(t)
    return tensors, None


def check_kv_layout(tensors, n_kv_heads, block_size, head_size, dtype):
    """(num_blocks, page_bytes, None) when every tensor can be APEX's host
    tier as it is, else (0, 0, why). vLLM's per-layer view is [B, H, N, C]
    (C = K|V of one token); APEX needs block b of a layer to be the dense
    bytes [b * page, (b + 1) * page), page = 2 * H * N * head_size * elem, so
    that vLLM's whole-block operations (zeroing new blocks, copy-on-write)
    act on APEX's blocks. The order inside a block does not matter: only
    APEX reads and writes it (forward_includes_kv_cache_update)."""
    want = (n_kv_heads, block_size, 2 * head_size)
    spans = []
    num_blocks = None
    for i, t in enumerate(tensors):
        if t.device.type != "cpu":
            return 0, 0, (f"vLLM's KV tensors are on {t.device}; APEX's paged attention reads "
                          "host memory in this version")
        if t.dtype != dtype:
            return 0, 0, f"layer {i}: KV dtype {t.dtype} differs from the model's {dtype}"
        if t.dim() != 4 or tuple(t.shape[1:]) != want:
            return 0, 0, (f"layer {i}: KV shape {tuple(t.shape)} is not [blocks, *{want}] "
                          "([B, H, N, C], K|V in C)")
        if num_blocks is not None and t.shape[0] != num_blocks:
            return 0, 0, f"layer {i}: {t.shape[0]} blocks, layer 0 has {num_blocks}"
        num_blocks = int(t.shape[0])
        dense = 1  # the block's interior must be dense in some dim order
        for stride, size in sorted(zip(t.stride()[1:], t.shape[1:])):
            if size > 1 and stride != dense:
                return 0, 0, (f"layer {i}: a block is not dense (strides {t.stride()}, "
                               f"shape {tuple(t.shape)})")
            dense *= size
        if num_blocks > 1 and t.stride(0) != dense:
            return 0, 0, (f"layer {i}: block stride {t.stride(0)} elements, a block is "
                          f"{dense}: vLLM's blocks are not adjacent (a block-outer layout "
                          "interleaves layers)")
        if t.data_ptr() % ops.HOST_KV_ALIGN:
            return 0, 0, f"layer {i}: KV memory not {ops.HOST_KV_ALIGN}-byte aligned"
        page = dense * t.element_size()
        spans.append((t.data_ptr(), t.data_ptr() + num_blocks * page, i))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            return 0, 0, f"layers {a} and {b} share KV memory"
    return num_blocks, page, None


class _Runtime:
    """One APEX context per vLLM worker process, shared by every layer."""

    def __init__(self):
        self.layer_index: dict[str, int] = {}
        self.block_size = 0
        self.max_model_len = 0
        self.ctx: ops.Context | None = None
        self.kv_tensors: list[torch.Tensor] | None = None  # vLLM's, when APEX's host tier
        self.kv_ptrs: list[int] | None = None
        self.kv_reason: str | None = None  # why APEX keeps its own pool (None: it does not)
        self.device_blocks = 0  # ids [0, device_blocks) on APEX's device tier
        self.copy_reader = copies.Reader()  # the scheduler's block copies (tier moves)
        self.copies_applied = 0  # blocks copied for the scheduler

    def add_layers(self, names, block_size, max_model_len):
        for name in names:
            self.layer_index.setdefault(name, len(self.layer_index))
        self.block_size = block_size
        self.max_model_len = max_model_len

    def apply_copies(self) -> None:
        """The block copies APEX's scheduler sent (apex_vllm.copies), before
        this step's first attention call. Without a context no block holds
        KV yet: nothing to copy."""
        for src, dst in self.copy_reader.take():
            if self.ctx is not None:
                self.ctx.copy_blocks(src, dst)
                self.copies_applied += len(src)

    def context(self, impl, query: torch.Tensor, kv_cache: torch.Tensor) -> ops.Context:
        if self.ctx is None:
            self.ctx = self._create(impl, query.dtype, kv_cache)
        return self.ctx

    def _create(self, impl, dtype, kv_cache) -> ops.Context:
        # One APEX block per vLLM block id: vLLM's block pool is APEX's. With a
        # device tier (apex_vllm.tiers), ids below device_blocks are APEX's
        # device blocks and the host tier is the rest of vLLM's tensor: host
        # block h is vLLM's block device_blocks + h, so vLLM's whole-block
        # zeroing and copies of host-tier ids still act on APEX's blocks.
        names = sorted(self.layer_index, key=self.layer_index.get)
        num_blocks = int(kv_cache.shape[0])
        max_batch = int(os.environ.get("APEX_MAX_BATCH", "256"))
        from . import tiers
        device = tiers.resolve().device_blocks
        if device >= num_blocks:
            raise RuntimeError(f"APEX: the device tier ({device} blocks) is not smaller than "
                               f"vLLM's pool ({num_blocks} blocks); lower "
                               "APEX_VLLM_DEVICE_BLOCKS / APEX_VLLM_DEVICE_MB")
        self.device_blocks = device
        geometry = (len(names), impl.num_heads, impl.num_kv_heads, impl.head_size, dtype,
                    self.block_size, device)
        tensors, why = vllm_layer_kv_tensors(names)
        if os.environ.get("APEX_VLLM_SHARE_KV", "1") == "0":
            tensors, why = None, "APEX_VLLM_SHARE_KV=0"
        if tensors is not None:
            shared_blocks, page, why = check_kv_layout(tensors, impl.num_kv_heads,
                                                       self.block_size, impl.head_size, dtype)
        if why is None:
            num_blocks = shared_blocks
            self.kv_tensors = tensors  # kept alive as long as the context
            self.kv_ptrs = [t.data_ptr() for t in tensors]
            logger.info("APEX: host KV tier in vLLM's KV tensors (%d layers x %d blocks, "
                        "held once; device tier: %d blocks)", len(names), num_blocks - device,
                        device)
            return ops.Context(*geometry, num_blocks - device, max_batch, self.max_model_len,
                               layer_ptrs=[p + device * page for p in self.kv_ptrs],
                               bytes_per_layer=(num_blocks - device) * page)
        self.kv_reason = why
        logger.warning("APEX: own host KV pool; vLLM's KV tensors stay allocated but unused "
                       "(KV held twice): %s", why)
        return ops.Context(*geometry, num_blocks - device, max_batch, self.max_model_len)

    def check_bound(self, index: int, kv_cache: torch.Tensor) -> None:
        """The layer's tensor is still the memory APEX's context was made over."""
        if self.kv_ptrs is not None and kv_cache.data_ptr() != self.kv_ptrs[index]:
            raise RuntimeError(f"APEX: vLLM rebound layer {index}'s KV tensor after APEX's "
                               "context was created over it")


RUNTIME = _Runtime()


class ApexAttentionBackend(AttentionBackend):
    # forward() stores this step's K/V itself (one op call before attention).
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16,
                                                     torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @classmethod
    def supported_kv_cache_layouts(cls):
        # Layer-outer and block-next: each layer's blocks are adjacent pages,
        # which is what APEX's host tier is (check_kv_layout).
        if KVCacheLayout is None:
            return None
        return (KVCacheLayout.LBHNC, KVCacheLayout.LBNHC)

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return ops.limits()["block_tokens"]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return ops.limits()["head_dims"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_impl_cls():
        return ApexAttentionImpl

    @staticmethod
    def get_builder_cls():
        return ApexMetadataBuilder


@dataclass
class ApexMetadata:
    num_actual_tokens: int
    max_query_len: int
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1]
    seq_lens: torch.Tensor         # int32 [num_reqs]
    block_table: torch.Tensor      # int32 [num_reqs, max_blocks]
    slot_mapping: torch.Tensor     # int64 [num_actual_tokens]


class ApexMetadataBuilder(AttentionMetadataBuilder[ApexMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        sizes = ops.limits()["block_tokens"]
        if kv_cache_spec.block_size not in sizes:
            raise ValueError(f"APEX: block size {kv_cache_spec.block_size} not in {sizes}")
        RUNTIME.add_layers(layer_names, kv_cache_spec.block_size,
                           vllm_config.model_config.max_model_len)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> ApexMetadata:
        RUNTIME.apply_copies()  # once per step, before any layer attends
        m = common_attn_metadata
        n = m.num_reqs
        return ApexMetadata(num_actual_tokens=m.num_actual_tokens,
                            max_query_len=m.max_query_len,
                            query_start_loc=m.query_start_loc[:n + 1],
                            seq_lens=m.seq_lens[:n],
                            block_table=m.block_table_tensor[:n],
                            slot_mapping=m.slot_mapping[:m.num_actual_tokens])


class ApexAttentionImpl(AttentionImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None):
        unsupported = [what for what, bad in (
            ("ALiBi", alibi_slopes is not None), ("attention sinks", sinks is not None),
            (f"attention type {attn_type}", attn_type != AttentionType.DECODER),
            ("KV sharing between layers", kv_sharing_target_layer_name is not None),
            (f"kv_cache_dtype {kv_cache_dtype}", kv_cache_dtype != "auto")) if bad]
        if unsupported:
            raise NotImplementedError("APEX backend: " + ", ".join(unsupported))
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.softcap = float(logits_soft_cap or 0.0)
        self.window = int(sliding_window or 0)
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type

    def forward(self, layer: AttentionLayer, query, key, value, kv_cache, attn_metadata,
                output, output_scale=None, output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("APEX backend: fused output quantization")
        if attn_metadata is None:  # profiling run: no KV cache yet
            return output
        ctx = RUNTIME.context(self, query, kv_cache)
        index = RUNTIME.layer_index[layer.layer_name]
        RUNTIME.check_bound(index, kv_cache)
        n = attn_metadata.num_actual_tokens
        ctx.kv_write(index, key[:n], value[:n], attn_metadata.slot_mapping)
        ctx.attention(index, query[:n].contiguous(), attn_metadata.query_start_loc,
                      attn_metadata.seq_lens, attn_metadata.block_table, output[:n],
                      self.scale, self.softcap, self.window)
        return output
