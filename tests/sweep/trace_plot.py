#!/usr/bin/env python3
"""tests/sweep/trace_plot.py TRACE.json OUT.png [--steps FIRST,COUNT] -
renders an APEX_TRACE file (Chrome trace-event JSON) as a timeline PNG: one
row per thread, spans coloured by kind, over COUNT steps from step FIRST
(default: the last 2 complete steps). Perfetto or chrome://tracing open the
same file interactively."""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"call": "#9ecae1", "attn_call": "#6baed6", "cpu_attn": "#d62728", "gpu_attn": "#2ca02c",
          "copy": "#ff7f0e", "wait": "#7f7f7f", "info": "#c7c7c7", "engine": "#f2e6ff",
          "step_gap": "#e0e0e0", "gpu": "#98df8a"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("png")
    ap.add_argument("--steps", default=None, help="FIRST,COUNT")
    a = ap.parse_args()
    doc = json.load(open(a.trace))
    evs = [e for e in doc["traceEvents"] if e.get("ph") == "X"]
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in doc["traceEvents"]
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    steps = sorted({e["args"]["step"] for e in evs if e["args"].get("step")})
    if a.steps:
        first, count = (int(x) for x in a.steps.split(","))
    else:
        count = 2
        first = max(steps[0], steps[-1] - count) if steps else 0
    want = set(range(first, first + count))
    sel = [e for e in evs if e["args"].get("step") in want]
    if not sel:
        raise SystemExit("trace_plot: no spans in steps %s" % sorted(want))
    t0 = min(e["ts"] for e in sel)
    threads = sorted({(e["pid"], e["tid"]) for e in sel}, key=lambda k: min(e["ts"] for e in sel
                                                                             if (e["pid"], e["tid"]) == k))
    row = {k: i for i, k in enumerate(threads)}
    fig, ax = plt.subplots(figsize=(14, 1.2 + 0.9 * len(threads)))
    # Outer spans first; a nested span is drawn thinner, on top of its parent.
    sel.sort(key=lambda e: (e["ts"], -e["dur"]))
    depth, open_ = {}, {}
    for e in sel:
        k = (e["pid"], e["tid"])
        stack = open_.setdefault(k, [])
        while stack and stack[-1] <= e["ts"]:
            stack.pop()
        depth[id(e)] = len(stack)
        stack.append(e["ts"] + e["dur"])
    seen = set()
    for e in sorted(sel, key=lambda e: depth[id(e)]):
        y = row[(e["pid"], e["tid"])]
        c = e.get("cat", "info")
        h = 0.8 * 0.65 ** depth[id(e)]
        ax.broken_barh([((e["ts"] - t0) / 1000.0, e["dur"] / 1000.0)], (y - h / 2, h),
                       facecolors=COLORS.get(c, "#cccccc"), edgecolor="none", label=c if c not in seen else None)
        seen.add(c)
    ax.set_yticks(range(len(threads)))
    ax.set_yticklabels([names.get(k, str(k[1])) for k in threads], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms (steps %d..%d)" % (first, first + count - 1))
    s = (doc.get("otherData") or {}).get("apex_summary") or {}
    ax.set_title("APEX_TRACE timeline; per layer per step: engine %.1f us, APEX %.1f us (CPU attn %.1f, copy %.1f, "
                 "wait %.1f, overhead %.1f), GPU-tier attn %.1f us"
                 % tuple(s.get(k, 0) for k in ("engine_us", "apex_us", "cpu_attn_us", "copy_us", "wait_us",
                                               "apex_overhead_us", "gpu_attn_us")), fontsize=9)
    ax.legend(fontsize=7, ncol=5, loc="upper right", bbox_to_anchor=(1.0, -0.12 - 0.02 * len(threads)))
    fig.tight_layout()
    fig.savefig(a.png, dpi=110)


if __name__ == "__main__":
    main()
