#!/usr/bin/env python3
"""serve_load.py - a real OpenAI client (the `openai` package from PyPI, in
the venv of setup_hooks/setup_client_venv.sh) against a llama-server, for
APEX's llama-server test and serving benchmark. Every mode prints one JSON
object on stdout (notices on stderr).

  serve_load.py chat URL [--concurrency C] [--max-tokens N] [--seed S] [--only I,J]
      the 16 test prompts (a few tokens to about 2k tokens; temperature 0,
      fixed seed; even ones streamed, odd ones not), C at a time; texts,
      finish reasons, token counts, errors
  serve_load.py probe URL --ctx-tokens N
      /health, /metrics, a prompt longer than the context (N tokens per
      slot), a malformed body, then a normal request: status codes and
      whether the server kept serving
  serve_load.py bench URL --requests N --concurrency C [--max-tokens T] [--pid PID]
      N chat completions from C concurrent clients (prompts cycled from the
      test set): completion tok/s, request latency p50/p99, errors, and the
      server's RSS before and after (with --pid)
"""
import argparse
import json
import sys
import threading
import time
import urllib.error
import urllib.request

import openai

# Filler for long prompts: numbered, varied sentences (deterministic).
_WORDS = ("river mill dawn lantern harbor copper orchard signal meadow winter ledger "
          "falcon quarry willow beacon thunder garden pilot canyon ember").split()


def _filler(n_words, salt):
    out = []
    i = 0
    while len(out) < n_words:
        a, b, c = (_WORDS[(i * 7 + salt) % len(_WORDS)], _WORDS[(i * 3 + salt * 5) % len(_WORDS)],
                   _WORDS[(i * 11 + salt * 2) % len(_WORDS)])
        out += f"Note {i + 1}: the {a} near the {b} kept its {c}.".split()
        i += 1
    return " ".join(out[:n_words])


def prompts():
    """16 chat prompts, from a few tokens to about 2k tokens (SmolLM2's
    tokenizer: about 1.4 tokens per filler word)."""
    short = ["Hi!", "What is 2+2?", "Name three colors.", "Write a haiku about the sea.",
             "Explain in one sentence what a compiler does."]
    out = [[{"role": "user", "content": s}] for s in short]
    # Mostly short (a test pass must stay short on 2 cores), one of about 2k tokens.
    for k, words in enumerate((10, 20, 30, 45, 60, 80, 110, 150, 220, 320, 1400)):
        text = _filler(words, k)
        out.append([{"role": "system", "content": "You are a concise assistant."},
                    {"role": "user", "content": f"{text}\n\nIn one sentence, what are these notes about?"}])
    return out


def client(url):
    return openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key="none", max_retries=0, timeout=600)


def one_chat(cl, messages, stream, max_tokens, seed):
    """Returns dict(text, finish, tokens, latency, error)."""
    t0 = time.monotonic()
    try:
        # cache_prompt off: each request computes its whole prompt, so a pass does
        # not depend on what an earlier pass left in the slots.
        kw = dict(model="default", messages=messages, temperature=0, seed=seed, max_tokens=max_tokens,
                  extra_body={"cache_prompt": False})
        if stream:
            parts, finish, tokens = [], None, 0
            for ev in cl.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
                if ev.choices:
                    d = ev.choices[0].delta.content
                    if d:
                        parts.append(d)
                    finish = ev.choices[0].finish_reason or finish
                if ev.usage:
                    tokens = ev.usage.completion_tokens
            text = "".join(parts)
        else:
            r = cl.chat.completions.create(**kw)
            text, finish, tokens = r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
        return {"text": text, "finish": finish, "tokens": tokens, "latency": time.monotonic() - t0,
                "error": None}
    except Exception as e:  # noqa: BLE001 - reported, counted
        return {"text": None, "finish": None, "tokens": 0, "latency": time.monotonic() - t0,
                "error": f"{type(e).__name__}: {e}"}


def run_pool(jobs, concurrency, fn):
    """Runs fn(job) for every job, `concurrency` at a time (threads: the
    client blocks on the network); results in job order."""
    results = [None] * len(jobs)
    nxt = [0]
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(jobs):
                return
            results[i] = fn(jobs[i])

    threads = [threading.Thread(target=worker) for _ in range(min(concurrency, len(jobs)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def cmd_chat(a):
    cl = client(a.url)
    ps = prompts()
    idx = [int(i) for i in a.only.split(",")] if a.only else list(range(len(ps)))
    jobs = [(i, ps[i], i % 2 == 0) for i in idx]
    t0 = time.monotonic()
    res = run_pool(jobs, a.concurrency, lambda j: one_chat(cl, j[1], j[2], a.max_tokens, a.seed))
    return {"concurrency": a.concurrency, "seconds": time.monotonic() - t0,
            "results": [dict(r, prompt=i, stream=s) for (i, _, s), r in zip(jobs, res)]}


def http(url, body=None, method="GET"):
    """(status, text) for a raw request (bad bodies the client library would refuse to send)."""
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json"} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def cmd_probe(a):
    base = a.url.rstrip("/")
    out = {}
    out["health"] = http(base + "/health")[0]
    st, text = http(base + "/metrics")
    out["metrics"] = st
    out["metrics_has_llamacpp"] = "llamacpp:" in text
    cl = client(a.url)
    too_long = [{"role": "user", "content": _filler(int(a.ctx_tokens * 1.0) + 200, 99)}]
    r = one_chat(cl, too_long, False, 8, 1)
    out["too_long_error"] = r["error"]
    st, text = http(base + "/v1/chat/completions", body=b'{"messages": [{"role": "user", "content": ',
                    method="POST")
    out["malformed_status"], out["malformed_body"] = st, text[:300]
    st, text = http(base + "/v1/chat/completions", body=b'{"messages": "not a list"}', method="POST")
    out["bad_field_status"] = st
    r = one_chat(cl, prompts()[1], False, 8, 1)
    out["after"] = {"error": r["error"], "text": r["text"]}
    out["health_after"] = http(base + "/health")[0]
    return out


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cmd_bench(a):
    cl = client(a.url)
    ps = prompts()
    jobs = [(ps[i % len(ps)], i % 2 == 0) for i in range(a.requests)]
    rss0 = rss_kib(a.pid) if a.pid else None
    t0 = time.monotonic()
    res = run_pool(jobs, a.concurrency, lambda j: one_chat(cl, j[0], j[1], a.max_tokens, 1))
    wall = time.monotonic() - t0
    rss1 = rss_kib(a.pid) if a.pid else None
    ok = [r for r in res if r["error"] is None]
    lat = sorted(r["latency"] for r in ok)

    def pct(p):
        return lat[min(len(lat) - 1, int(round(p / 100.0 * (len(lat) - 1))))] if lat else None

    toks = sum(r["tokens"] for r in ok)
    return {"requests": a.requests, "concurrency": a.concurrency, "max_tokens": a.max_tokens,
            "seconds": wall, "completion_tokens": toks, "tok_per_s": toks / wall if wall > 0 else None,
            "p50_s": pct(50), "p99_s": pct(99), "errors": len(res) - len(ok),
            "first_error": next((r["error"] for r in res if r["error"]), None),
            "rss_kib_before": rss0, "rss_kib_after": rss1}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("chat")
    c.add_argument("url")
    c.add_argument("--concurrency", type=int, default=16)
    c.add_argument("--max-tokens", type=int, default=16)
    c.add_argument("--seed", type=int, default=1234)
    c.add_argument("--only", default="")
    p = sub.add_parser("probe")
    p.add_argument("url")
    p.add_argument("--ctx-tokens", type=int, required=True)
    b = sub.add_parser("bench")
    b.add_argument("url")
    b.add_argument("--requests", type=int, default=64)
    b.add_argument("--concurrency", type=int, default=8)
    b.add_argument("--max-tokens", type=int, default=64)
    b.add_argument("--pid", type=int, default=0)
    a = ap.parse_args()
    out = {"chat": cmd_chat, "probe": cmd_probe, "bench": cmd_bench}[a.cmd](a)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
