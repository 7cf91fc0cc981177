#!/usr/bin/env python3
"""tests/sweep/plot_sweep.py SWEEP.json OUT.png - the sweep's plot: measured
against predicted hybrid / native-fit tokens/s per point (left), and each
point's ms per step, native and hybrid, with the predicted hybrid step
(right)."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    rep = json.load(open(sys.argv[1]))
    pts = rep["points"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1, 1.5]})
    xs, ys, labels = [], [], []
    for p in pts:
        if p.get("predicted_ratio_vs_fit") and p.get("measured_ratio_vs_fit"):
            xs.append(p["predicted_ratio_vs_fit"])
            ys.append(p["measured_ratio_vs_fit"])
            labels.append("B%d N%d c%d" % (p["b"], p["n"], p["ctx"]))
    if xs:
        lo, hi = min(xs + ys) * 0.8, max(xs + ys) * 1.25
        a.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="measured = predicted")
        a.scatter(xs, ys, c=["C%d" % (i % 10) for i in range(len(xs))], zorder=3)
        for x, y, t in zip(xs, ys, labels):
            a.annotate(t, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        a.axhline(1.0, color="grey", lw=0.6)
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlim(lo, hi)
        a.set_ylim(lo, hi)
    a.set_xlabel("predicted hybrid / native-fit tok/s (model, profile measured here)")
    a.set_ylabel("measured hybrid / native-fit tok/s")
    a.set_title("%s sweep: measured vs predicted" % rep["mode"])
    a.legend(fontsize=8, loc="upper left")
    names = ["native_fit", "native_all", "native_nkvo", "apex_hybrid"]
    w = 0.18
    idx = range(len(pts))
    for k, nm in enumerate(names):
        vals = [(p[nm] or {}).get("ms_per_step", 0) for p in pts]
        b.bar([i + (k - 1.5) * w for i in idx], vals, w, label=nm)
    pred = [p.get("predicted_hybrid_ms") for p in pts]
    b.scatter([i + 1.5 * w for i in idx if pred[i]], [v for v in pred if v], marker="_", s=300, c="k",
              zorder=3, label="predicted hybrid step")
    b.set_xticks(list(idx))
    b.set_xticklabels(["B%d N%d\nc%d" % (p["b"], p["n"], p["ctx"]) for p in pts], fontsize=7)
    b.set_ylabel("ms per decode step")
    b.set_yscale("log")
    b.set_title("step time per point (%s, %s threads, %s tokens)" % (rep["model"], rep["threads"], rep["tokens"]))
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
