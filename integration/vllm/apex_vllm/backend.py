"""APEX as a vLLM v1 attention backend (registered as AttentionBackendEnum.CUSTOM).

Thin by design: the metadata builder passes vLLM's own tensors through, and
the impl's forward makes two calls into C (torch ops from shim/torch): store
this step's K/V rows by vLLM's slot mapping, then causal attention over
vLLM's block tables. APEX owns the KV memory (its pinned host pool, one
block per vLLM block id) and runs every FLOP of attention; vLLM's own
per-layer KV tensor is not read.
"""
import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.v1.attention.backend import (AttentionBackend, AttentionImpl, AttentionLayer,
                                       AttentionMetadataBuilder, AttentionType,
                                       CommonAttentionMetadata)

from . import ops

APEX_HEAD_SIZES = [64, 80, 96, 128, 256]
APEX_BLOCK_SIZES = [8, 16, 32, 64, 128, 256]


class _Runtime:
    """One APEX context per vLLM worker process, shared by every layer."""

    def __init__(self):
        self.layer_index: dict[str, int] = {}
        self.block_size = 0
        self.max_model_len = 0
        self.ctx: ops.Context | None = None

    def add_layers(self, names, block_size, max_model_len):
        for name in names:
            self.layer_index.setdefault(name, len(self.layer_index))
        self.block_size = block_size
        self.max_model_len = max_model_len

    def context(self, impl, query: torch.Tensor, kv_cache: torch.Tensor) -> ops.Context:
        if self.ctx is None:
            # One APEX block per vLLM block id: vLLM's block pool is APEX's.
            num_blocks = int(kv_cache.shape[0])
            max_batch = int(os.environ.get("APEX_MAX_BATCH", "256"))
            self.ctx = ops.Context(len(self.layer_index), impl.num_heads, impl.num_kv_heads,
                                   impl.head_size, query.dtype, self.block_size, 0, num_blocks,
                                   max_batch, self.max_model_len)
        return self.ctx


RUNTIME = _Runtime()


class ApexAttentionBackend(AttentionBackend):
    # forward() stores this step's K/V itself (one op call before attention).
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16,
                                                     torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return list(APEX_BLOCK_SIZES)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(APEX_HEAD_SIZES)

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
        if kv_cache_spec.block_size not in APEX_BLOCK_SIZES:
            raise ValueError(f"APEX: block size {kv_cache_spec.block_size} not in "
                             f"{APEX_BLOCK_SIZES}")
        RUNTIME.add_layers(layer_names, kv_cache_spec.block_size,
                           vllm_config.model_config.max_model_len)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> ApexMetadata:
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
        n = attn_metadata.num_actual_tokens
        ctx.kv_write(index, key[:n], value[:n], attn_metadata.slot_mapping)
        ctx.attention(index, query[:n].contiguous(), attn_metadata.query_start_loc,
                      attn_metadata.seq_lens, attn_metadata.block_table, output[:n],
                      self.scale, self.softcap, self.window)
        return output
