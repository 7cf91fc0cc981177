"""The torch-op shim (shim/torch) on CUDA tensors, on a device machine (no
vLLM there): apex.kv_write / apex.attention through apex_vllm.ops with q, k,
v, out, block tables and slot mapping on the GPU, staged by APEX on torch's
current stream, checked against torch's own causal SDPA on the GPU. Prints
one JSON line; exit 0 only if every check passed.

    APEX_TORCH_LIB=.../libapex_torch.so APEX_DEVICE=cuda python test_torch_shim.py"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "integration", "vllm"))
from apex_vllm import ops  # noqa: E402  (torch only; no vLLM needed)

HQ, HK, D, BS, NBLK = 8, 2, 128, 16, 96


def run_case(dtype, stream, tol):
    ctx = ops.Context(1, HQ, HK, D, dtype, BS, 0, NBLK, 64, 512)
    g = torch.Generator().manual_seed(0)
    dev = "cuda"
    # two requests: a 37-token prompt, then a chunk of 9 more beside a new
    # 20-token prompt (engine-chosen, scattered block ids)
    perm = torch.randperm(NBLK, generator=g).tolist()
    tables = {0: perm[:4], 1: perm[4:8]}  # 4 blocks each, the table's width
    hist = {}
    worst = 0.0
    for work in ([(0, 37)], [(0, 9), (1, 20)]):
        qsl, lens, slots = [0], [], []
        for s, n in work:
            start = hist.get(s, (torch.empty(0, HK, D, device=dev),))[0].shape[0]
            slots += [tables[s][p // BS] * BS + p % BS for p in range(start, start + n)]
            qsl.append(qsl[-1] + n)
            lens.append(start + n)
        T = qsl[-1]
        qkv = torch.randn(T, (HQ + 2 * HK) * D, generator=g).to(dev, dtype)
        q = qkv[:, :HQ * D].reshape(T, HQ, D)
        k = qkv[:, HQ * D:(HQ + HK) * D].view(T, HK, D)  # strided rows, as in vLLM
        v = qkv[:, (HQ + HK) * D:].view(T, HK, D)
        bt = torch.tensor([tables[s] for s, _ in work], dtype=torch.int32, device=dev)
        out = torch.full((T, HQ, D), float("nan"), dtype=dtype, device=dev)
        with torch.cuda.stream(stream):
            ctx.kv_write(0, k, v, torch.tensor(slots, dtype=torch.int64, device=dev))
            ctx.attention(0, q.contiguous(), torch.tensor(qsl, dtype=torch.int32, device=dev),
                          torch.tensor(lens, dtype=torch.int32, device=dev), bt, out,
                          D ** -0.5, 0.0, 0)
        torch.cuda.synchronize()
        for i, (s, n) in enumerate(work):
            rows = slice(qsl[i], qsl[i + 1])
            pk, pv = hist.get(s, (torch.empty(0, HK, D, device=dev, dtype=dtype),) * 2)
            ak, av = torch.cat([pk, k[rows]]), torch.cat([pv, v[rows]])
            hist[s] = (ak, av)
            L = ak.shape[0]
            mask = torch.ones(n, L, dtype=torch.bool, device=dev).tril(L - n)
            ref = torch.nn.functional.scaled_dot_product_attention(
                q[rows].float().transpose(0, 1),
                ak.float().repeat_interleave(HQ // HK, 1).transpose(0, 1),
                av.float().repeat_interleave(HQ // HK, 1).transpose(0, 1), attn_mask=mask,
                scale=D ** -0.5).transpose(0, 1)
            worst = max(worst, (ref - out[rows].float()).abs().max().item())
    st = ctx.stats()
    ctx.close()
    ok = worst < tol and st["errors"] == 0 and st["rows_attended_host"] == 66
    return {"dtype": str(dtype), "stream": "default" if stream is None else "side",
            "max_abs_err": worst, "tol": tol, "stats": st, "ok": ok}


def main():
    res = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
           "lib": ops.library_path(), "cases": []}
    side = torch.cuda.Stream()
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)):
        for stream in (None, side):
            try:
                res["cases"].append(run_case(dtype, stream, tol))
            except Exception as e:  # report and go on: one JSON for all cases
                res["cases"].append({"dtype": str(dtype), "ok": False, "error": repr(e)})
    res["ok"] = all(c["ok"] for c in res["cases"])
    print(json.dumps(res))
    passed = sum(c["ok"] for c in res["cases"])
    print(f"{passed} passed, {len(res['cases']) - passed} failed")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
