"""Loads APEX's torch ops (shim/torch, registered from C) and raises on a
failed status with APEX's own message."""
import atexit
import ctypes
import glob
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.abspath(os.path.join(_HERE, "..", "..", ".."))
_libapex = None

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
HOST_KV_ALIGN = 64  # APEX_PAGED_HOST_KV_ALIGN (apex_paged.h)


def library_path() -> str:
    """APEX_TORCH_LIB, else the wheel's copy, else a build folder of the repo."""
    env = os.environ.get("APEX_TORCH_LIB")
    if env:
        return env
    for cand in [os.path.join(_HERE, "lib", "libapex_torch.so")] + sorted(
            glob.glob(os.path.join(_REPO, "build*", "lib", "libapex_torch.so"))):
        if os.path.exists(cand):
            return cand
    raise RuntimeError("APEX: libapex_torch.so not found (pip install the repo, or set "
                       "APEX_TORCH_LIB)")


def load():
    """Registers torch.ops.apex once per process; returns it."""
    global _libapex
    if _libapex is None:
        path = library_path()
        torch.ops.load_library(path)
        if not hasattr(torch.ops.apex, "attention"):
            raise RuntimeError(f"APEX: {path} loaded but registered no ops")
        # The same libapex.so the shim links (thread-local last error).
        _libapex = ctypes.CDLL(os.path.join(os.path.dirname(path), "libapex.so.1"))
        _libapex.apex_last_error.restype = ctypes.c_char_p
        _libapex.apex_status_name.restype = ctypes.c_char_p
        if os.environ.get("APEX_TRACE"):
            # APEX_TRACE's timeline is written by libapex at exit; vLLM ends
            # its engine processes through Python, so flush from there too.
            atexit.register(_libapex.apex_trace_flush)
    return torch.ops.apex


def libapex() -> ctypes.CDLL:
    """libapex.so as ctypes sees it: the library the shim links (one copy of
    APEX's state and its thread-local last error)."""
    load()
    return _libapex


def dtype_size(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class _Limits(ctypes.Structure):  # apex_limits (apex.h)
    _fields_ = [("head_dims", ctypes.c_int32 * 8), ("block_tokens", ctypes.c_int32 * 8),
                ("kv_dtypes", ctypes.c_uint32), ("act_dtypes", ctypes.c_uint32),
                ("max_layers", ctypes.c_int32), ("max_kv_heads", ctypes.c_int32),
                ("max_q_heads", ctypes.c_int32), ("max_seqs", ctypes.c_int32),
                ("max_seq_len", ctypes.c_int32), ("host_kv_align", ctypes.c_int32)]


_limits = None


def limits() -> dict:
    """What libapex accepts (apex_limits_get): head_dims and block_tokens as
    lists, the rest as numbers. Asked once; never a copy of libapex's lists."""
    global _limits
    if _limits is None:
        load()
        lim = _Limits()
        check(_libapex.apex_limits_get(ctypes.byref(lim)), "apex_limits_get")
        _limits = {name: ([v for v in getattr(lim, name) if v] if name in ("head_dims", "block_tokens")
                          else getattr(lim, name)) for name, _ in _Limits._fields_}
    return _limits


def check(status: int, what: str) -> None:
    if status != 0:
        name = _libapex.apex_status_name(status).decode()
        msg = _libapex.apex_last_error().decode()
        raise RuntimeError(f"APEX {what}: {name}: {msg}")


class Context:
    """One APEX context whose blocks the engine owns (apex_paged_claim). With
    layer_ptrs (one address per layer) its host tier is that memory, which
    the caller keeps alive until close() (apex_paged_context_create)."""

    def __init__(self, n_layers, n_q_heads, n_kv_heads, head_dim, dtype, block_tokens,
                 device_blocks, host_blocks, max_batch, max_seq_len, layer_ptrs=None,
                 bytes_per_layer=0):
        ops = load()
        args = (n_layers, n_q_heads, n_kv_heads, head_dim, DTYPES[dtype], block_tokens,
                device_blocks, host_blocks, max_batch, max_seq_len)
        if layer_ptrs is None:
            h = ops.context_create(*args)
        else:
            ptrs = torch.tensor(layer_ptrs, dtype=torch.int64)
            h = ops.context_create_on(*args, ptrs, bytes_per_layer)
        if h <= 0:
            check(-h, "context_create")
        self.handle = h
        self.ops = ops

    def kv_write(self, layer, key, value, slot_mapping):
        check(self.ops.kv_write(self.handle, layer, key, value, slot_mapping), "kv_write")

    def attention(self, layer, query, query_start_loc, seq_lens, block_table, out, scale,
                  softcap, window):
        check(self.ops.attention(self.handle, layer, query, query_start_loc, seq_lens,
                                 block_table, out, scale, softcap, window), "attention")

    def copy_blocks(self, src, dst):
        """Whole blocks src[i] -> dst[i], all layers, either tier (engine ids)."""
        check(self.ops.copy_blocks(self.handle, torch.tensor(src, dtype=torch.int64),
                                   torch.tensor(dst, dtype=torch.int64)), "copy_blocks")

    def stats(self) -> dict:
        keys = ("attention_calls", "rows_attended_host", "kv_rows_written", "errors",
                "host_blocks", "host_mode", "host_kv_own_bytes", "host_kv_external_bytes",
                "rows_attended_device", "device_blocks")
        return dict(zip(keys, self.ops.stats(self.handle)))

    def close(self):
        if self.handle:
            self.ops.context_destroy(self.handle)
            self.handle = 0
