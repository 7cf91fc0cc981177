#!/usr/bin/env python3
"""tests/sweep/sweep.py - the hybrid sweep: llama.cpp native against llama.cpp
+ APEX hybrid, one JSON and one PNG.

Per point (B sequences fit the GPU's KV budget, N = 2B or 3B run, CTX tokens
of context per sequence), four runs of apex-llama-run:
  native_fit   native llama.cpp with the B sequences that fit
  native_all   native with all N (uncapped: the ceiling)
  native_nkvo  native with all N and the KV on the host (-nkvo)
  apex_hybrid  APEX: B sequences on the GPU tier, N - B on the CPU kernel,
               with libapex's per-step summary (APEX_TRACE_SUMMARY=1)
then the model's predicted hybrid / native-fit ratio (apex-sweep-predict:
a profile measured on this machine, see sweep_predict.c) beside the measured
one. Two modes:
  --cuda      a CUDA build of llama.cpp on a GPU (tests/gpu/run_llama_hybrid.sh)
  --emulated  the CPU build, APEX's tier on the emulated device
              (APEX_GGML_HYBRID=1 APEX_DEVICE=emulated), small sizes: the
              sweep's logic, JSON and plot, checked in CI (./apex test).
In the emulated mode "native" is ggml-cpu and the "GPU" is the emulated
device (APEX's reference kernels on a thread), so its ratios say nothing
about a GPU; the checks there are that every run ran and the report is whole.

  sweep.py --emulated|--cuda --run APEX_LLAMA_RUN --shim LIBGGML_APEX
           --lib LIBAPEX --predict APEX_SWEEP_PREDICT --model GGUF --out DIR
           [--b 4,8] [--n-mult 2,3] [--ctx 256,1024,4096] [--tokens 32]
           [--threads N] [--geom L,HQ,HK,D]
Writes DIR/sweep.json and DIR/sweep.png (progress on stderr); exit 0 when
every run ran and the report was written.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    sys.stderr.write("[sweep] %s\n" % msg)
    sys.stderr.flush()


def run_one(args, name, np_, fill, apex_env, extra):
    env = dict(os.environ)
    for k in ("GGML_BACKEND_PATH", "LD_PRELOAD", "APEX_STATS_FILE", "APEX_TRACE", "APEX_TRACE_SUMMARY"):
        env.pop(k, None)
    env.update(apex_env)
    cmd = [args.run, "-m", args.model, "-np", str(np_), "-n", str(args.tokens), "-t", str(args.threads),
           "--logit-steps", "0", "--no-checks", "--fill", str(fill)] + extra
    t0 = time.time()
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=args.run_timeout)
    with open(os.path.join(args.out, name + ".log"), "w") as f:
        f.write(" ".join(cmd) + "\n" + r.stderr)
    if r.returncode != 0:
        log("%s FAILED (%d): %s" % (name, r.returncode, r.stderr.strip().splitlines()[-1:]))
        return None
    out = json.loads(r.stdout)
    log("%s: %.1f tok/s, %.2f ms/step (%.1f s)" % (name, out["tok_s"], out["ms_per_step"], time.time() - t0))
    return out


def brief(r):
    if r is None:
        return None
    d = {"tok_s": r["tok_s"], "ms_per_step": r["ms_per_step"], "sequences": r["prompts"],
         "prefill_tokens": r["prefill_tokens"], "t_prefill": r["t_prefill"]}
    a = r.get("apex") or {}
    if a:
        d.update({"gpu_attn": a.get("gpu_attn"), "stream_gpu": a.get("stream_gpu"),
                  "stream_attn": a.get("stream_attn")})
    if r.get("apex_summary"):
        d["trace_summary"] = r["apex_summary"]
    return d


def plot_interpreter():
    """A Python with matplotlib: this one, or the system's (Debian's
    python3-matplotlib, which setup_hooks/install_deps.sh installs)."""
    for py in (sys.executable, "/usr/bin/python3"):
        if py and os.path.exists(py) and subprocess.run([py, "-c", "import matplotlib"],
                                                        stderr=subprocess.DEVNULL).returncode == 0:
            return py
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--emulated", action="store_true")
    mode.add_argument("--cuda", action="store_true")
    ap.add_argument("--run", required=True)
    ap.add_argument("--shim", required=True)
    ap.add_argument("--lib", required=True)
    ap.add_argument("--predict", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--b", default="4,8")
    ap.add_argument("--n-mult", default="2,3")
    ap.add_argument("--ctx", default="256,1024,4096")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--geom", required=True, help="L,HQ,HK,D of the model (the prediction's geometry)")
    ap.add_argument("--exact", default="0", help="APEX_GGML_EXACT for the hybrid runs")
    ap.add_argument("--run-timeout", type=int, default=300)
    ap.add_argument("--trace-point", default=None,
                    help="b<B>_n<N>_ctx<CTX>: that point's hybrid run also writes DIR/<point>.trace.json (APEX_TRACE)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for p in (args.run, args.shim, args.lib, args.predict, args.model):
        if not os.path.exists(p):
            sys.exit("sweep: missing %s" % p)
    bs = [int(x) for x in args.b.split(",")]
    mults = [int(x) for x in args.n_mult.split(",")]
    ctxs = [int(x) for x in args.ctx.split(",")]
    t_start = time.time()

    gpu = [] if args.emulated else ["-ngl", "99"]
    apex_env = {"GGML_BACKEND_PATH": args.shim, "APEX_TRACE_SUMMARY": "1",
                "APEX_GGML_EXACT": args.exact, "APEX_GGML_QUIET": "1"}
    if args.emulated:
        apex_env.update({"APEX_GGML_HYBRID": "1", "APEX_DEVICE": "emulated"})
    else:
        apex_env.update({"APEX_DEVICE": "cuda"})

    points = []
    for b in bs:
        for m in mults:
            n = b * m
            for ctx in ctxs:
                tag = "b%d_n%d_ctx%d" % (b, n, ctx)
                # The filler makes the context: the prompt adds a few tokens.
                fill = max(ctx - 16, 0)
                runs = {
                    "native_fit": run_one(args, tag + "_native_fit", b, fill, {}, gpu),
                    "native_all": run_one(args, tag + "_native_all", n, fill, {}, gpu),
                    # A CPU build keeps the KV on the host anyway: -nkvo is native_all there.
                    "native_nkvo": None if args.emulated else run_one(args, tag + "_native_nkvo", n, fill, {},
                                                                      gpu + ["-nkvo"]),
                    "apex_hybrid": run_one(args, tag + "_apex_hybrid", n, fill,
                                           dict(apex_env, APEX_GGML_GPU_SEQS=str(b),
                                                **({"APEX_TRACE": os.path.join(args.out, tag + ".trace.json")}
                                                   if tag == args.trace_point else {})), gpu),
                }
                if args.emulated:
                    runs["native_nkvo"] = runs["native_all"]
                points.append({"b": b, "n": n, "ctx": ctx, "runs": runs})

    # The prediction: one call, every point whose runs all ran.
    pred_args, pred_idx = [], []
    for i, p in enumerate(points):
        r = p["runs"]
        h = r["apex_hybrid"]
        s = (h or {}).get("apex_summary") or {}
        if not (r["native_fit"] and r["native_all"] and h and s.get("gpu_attn_us_per_layer", 0) > 0):
            continue
        # Mean attended context in the decode loop: the prompt, then half the generated tokens.
        p["ctx_mean"] = h["prefill_tokens"] / h["prompts"] + args.tokens / 2.0
        pred_args += ["--point", "%d,%d,%.1f,%.4f,%.4f,%.4f" % (
            p["b"], p["n"], p["ctx_mean"], r["native_fit"]["ms_per_step"], r["native_all"]["ms_per_step"],
            s["gpu_attn_us_per_layer"])]
        pred_idx.append(i)
    prediction = None
    if pred_args:
        pr = subprocess.run([args.predict, "--geom", args.geom, "--threads", str(args.threads)] + pred_args,
                            stdout=subprocess.PIPE, text=True)
        if pr.returncode == 0:
            prediction = json.loads(pr.stdout)
            for i, pp in zip(pred_idx, prediction["points"]):
                points[i]["predicted"] = pp
        else:
            log("apex-sweep-predict failed (%d)" % pr.returncode)

    rows = []
    for p in points:
        r = p["runs"]
        h, fit, nkvo, alln = r["apex_hybrid"], r["native_fit"], r["native_nkvo"], r["native_all"]
        row = {"b": p["b"], "n": p["n"], "ctx": p["ctx"], "ctx_mean": p.get("ctx_mean"),
               "native_fit": brief(fit), "native_all": brief(alln), "native_nkvo": brief(nkvo),
               "apex_hybrid": brief(h)}
        if h and fit:
            row["measured_ratio_vs_fit"] = round(h["tok_s"] / fit["tok_s"], 4)
        if h and nkvo:
            row["measured_ratio_vs_nkvo"] = round(h["tok_s"] / nkvo["tok_s"], 4)
        if h and alln:
            row["measured_ratio_vs_all"] = round(h["tok_s"] / alln["tok_s"], 4)
        pr = p.get("predicted")
        if pr:
            row["predicted_ratio_vs_fit"] = pr["pred_ratio_vs_fit"]
            row["predicted_hybrid_ms"] = pr["pred_hybrid_ms"]
            row["predicted_cpu_branch_ms"] = pr["pred_cpu_branch_ms"]
            row["measured_over_predicted_step"] = round(h["ms_per_step"] / pr["pred_hybrid_ms"], 4)
        rows.append(row)

    # The criteria, evaluated where they apply (a GPU run).
    ok_runs = all(all(v is not None for v in p["runs"].values()) for p in points)
    crit = None
    if args.cuda:
        pays = [r for r in rows if r.get("predicted_ratio_vs_fit", 0) >= 1.3]
        crit = {
            "hybrid_ge_1.2x_fit_where_model_ge_1.3x": all(r.get("measured_ratio_vs_fit", 0) >= 1.2 for r in pays)
            if pays else None,
            "points_where_model_ge_1.3x": len(pays),
            "hybrid_ge_10x_nkvo_everywhere": all(r.get("measured_ratio_vs_nkvo", 0) >= 10 for r in rows),
            "step_within_15pct_of_predicted": all(abs(r.get("measured_over_predicted_step", 99) - 1) <= 0.15
                                                  for r in rows),
        }
    report = {
        "report": "llama.cpp native vs llama.cpp + APEX hybrid, measured and predicted",
        "mode": "emulated" if args.emulated else "cuda",
        "model": os.path.basename(args.model),
        "geom": args.geom,
        "threads": args.threads,
        "tokens": args.tokens,
        "apex_exact_mode": args.exact == "1",
        "all_runs_ran": ok_runs,
        "seconds": round(time.time() - t_start, 1),
        "profile": {k: v for k, v in (prediction or {}).items() if k != "points"},
        "criteria": crit,
        "points": rows,
    }
    if args.emulated:
        report["note"] = ("emulated: native is ggml-cpu and the GPU tier is the emulated device (reference "
                          "kernels on a thread); the ratios check the sweep's logic, not a GPU's physics")
    jpath = os.path.join(args.out, "sweep.json")
    with open(jpath, "w") as f:
        json.dump(report, f, indent=1)
    py = plot_interpreter()
    png = os.path.join(args.out, "sweep.png")
    if py:
        pr = subprocess.run([py, os.path.join(HERE, "plot_sweep.py"), jpath, png])
        if pr.returncode != 0:
            log("plot failed")
            png = None
    else:
        log("no matplotlib: no plot (tests/sweep/plot_sweep.py %s OUT.png makes it)" % jpath)
        png = None
    log("wrote %s%s in %.0f s" % (jpath, " and " + png if png else "", time.time() - t_start))
    print(json.dumps({"json": jpath, "png": png, "all_runs_ran": ok_runs, "points": len(rows),
                      "predicted_points": len(pred_idx)}))
    return 0 if ok_runs and prediction and len(pred_idx) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
