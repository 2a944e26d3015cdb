"""kvprobe serve under load, against the same prompts in process and through `transformers serve`.

    python benchmarks/serve_load.py                          # SmolLM2's shipped generator, ~10 min on 2 cores
    python benchmarks/serve_load.py --generator FOLDER --requests 2 --concurrency 1 2 --no-transformers   # reduced

Everything runs against 127.0.0.1 only, with a fixed number of requests per level and a global deadline. One
server process (`kvprobe serve`, greedy, the chosen policy) answers `--requests` streamed chat requests at each
concurrency; then, alternated `--pairs` times, the server at concurrency 1 and the same prompts one by one through
`KVProbeGenerator.generate` in this process. `transformers serve` then runs on the same base model folder at the
same concurrencies (its answers are unsteered: the plain
chat, no mode instruction, so their lengths differ: compare tokens/s). Then an overload pass sends twice the
server's capacity (batch + queue) at once: no 5xx, and how soon the first 429 comes back; then the server is filled
with long requests and single requests are timed from their own send to their 429. Then a short request
(8 tokens) is timed alone and sent 0.3 s after a long one (same policy, `--long-tokens`): with continuous
batching it joins the long one's batch.

Figures: `lost` (no answer at all), `failed` (an error status outside the overload pass), completion tokens/s per
level, p50/p95 time to first token and end to end, `throughput_c8_over_c1`, `overhead_c1_over_in_process` (server
wall at concurrency 1 / in-process wall, the median of the alternated passes), `steering_share` (probe seconds /
wall, in process), `server_steering_share` (the server's probe seconds over the concurrency levels / their wall),
`over_transformers_serve` (kvprobe tokens/s / transformers serve tokens/s at concurrency 8, or the highest level
run), `overload_5xx`, `overload_first_429_s`, `overload_full_429_max_s`, `short_behind_long_over_alone`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import httpx

from common import emit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"What is {rng.randint(2, 99)} {rng.choice('+-*')} {rng.randint(2, 99)}?" for _ in range(n)]


@contextlib.contextmanager
def process(args: list[str], url: str, deadline: float, env: dict | None = None):
    """A server process, ready once GET /health says 200 (or /v1/models, for servers without /health)."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{args[0:3]} exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.25)
        else:
            raise TimeoutError(f"{args[0:3]} was not ready before the deadline")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed chat request: status, time to first text, end to end, completion tokens."""
    t0 = time.perf_counter()
    out = {"status": None, "ttft": None, "e2e": None, "tokens": 0, "text": ""}
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body | {
                "stream": True, "stream_options": {"include_usage": True}}) as r:
            out["status"] = r.status_code
            if r.status_code != 200:
                await r.aread()
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    out["tokens"] = chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices") or []:
                    piece = (c.get("delta") or {}).get("content")
                    if piece:
                        out["ttft"] = out["ttft"] or time.perf_counter() - t0
                        out["text"] += piece
    except httpx.HTTPError as err:
        out["error"] = repr(err)
    out["e2e"] = time.perf_counter() - t0
    return out


def metric(url: str, name: str) -> float:
    """A metric's value from the server's ``/metrics`` (0 when absent)."""
    lines = httpx.get(url + "/metrics").text.splitlines()
    return next((float(line.split()[-1]) for line in lines if line.startswith(name + " ")), 0.0)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


async def level(url: str, model: str, questions: list[str], concurrency: int, max_tokens: int, extra: dict) -> dict:
    """Every question once, ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def ask(q):
            async with gate:
                return await one(client, url, {"model": model, "messages": [{"role": "user", "content": q}],
                                               "max_tokens": max_tokens, "temperature": 0} | extra)

        t0 = time.perf_counter()
        runs = await asyncio.gather(*[ask(q) for q in questions])
        wall = time.perf_counter() - t0
    ok = [r for r in runs if r["status"] == 200]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None] or [float("nan")]
    e2e = [r["e2e"] for r in ok] or [float("nan")]
    return {"concurrency": concurrency, "requests": len(runs), "lost": sum(r["status"] is None for r in runs),
            "failed": sum(r["status"] not in (None, 200) for r in runs), "wall_s": round(wall, 3),
            "completion_tokens": sum(r["tokens"] for r in ok), "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 3),
            "p50_ttft_s": round(pct(ttft, 0.5), 4), "p95_ttft_s": round(pct(ttft, 0.95), 4),
            "p50_e2e_s": round(pct(e2e, 0.5), 4), "p95_e2e_s": round(pct(e2e, 0.95), 4), "texts": [r["text"] for r in runs]}


async def overload(url: str, model: str, count: int, max_tokens: int) -> dict:
    """``count`` requests at once (non-streamed): statuses, and when the first 429 came back (from the burst's start,
    which includes this process opening ``count`` connections on the same cores)."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=count + 4)) as client:
        t0 = time.perf_counter()

        async def ask(i):
            try:
                r = await client.post(url + "/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": f"What is {i} + {i}?"}], "max_tokens": max_tokens})
                return r.status_code, time.perf_counter() - t0
            except httpx.HTTPError:
                return None, time.perf_counter() - t0

        runs = await asyncio.gather(*[ask(i) for i in range(count)])
    first_429 = min((t for s, t in runs if s == 429), default=None)
    return {"requests": count, "ok": sum(s == 200 for s, _ in runs), "rejected_429": sum(s == 429 for s, _ in runs),
            "5xx": sum(s is not None and s >= 500 for s, _ in runs), "lost": sum(s is None for s, _ in runs),
            "first_429_s": None if first_429 is None else round(first_429, 4)}


async def refused_when_full(url: str, model: str, capacity: int, max_waiting: int, fill_tokens: int, probes: int = 5) -> dict:
    """Fill the server with long streamed requests, one at a time until ``/metrics`` says ``max_waiting`` are queued,
    then send ``probes`` requests one at a time, each timed from its own send to its answer; then the long ones hang
    up (the server frees their rows) and the server is left idle."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=2 * capacity + 8)) as client:
        long = lambda i: {"model": model + ":slow", "max_tokens": fill_tokens, "messages": [  # noqa: E731
            {"role": "user", "content": f"Write the numbers from {7 + i} to 400 in words, one per line."}]}  # SmolLM2: to the cap
        fill, deadline = [], time.time() + 60
        while await asyncio.to_thread(metric, url, "kvprobe_requests_waiting") < max_waiting and len(fill) < 2 * capacity \
                and time.time() < deadline:
            fill.append(asyncio.create_task(one(client, url, long(len(fill)))))
            await asyncio.sleep(0.1)
        full = []
        for _ in range(probes):
            t0 = time.perf_counter()
            r = await client.post(url + "/v1/chat/completions", json={"model": model, "max_tokens": 8, "messages": [
                {"role": "user", "content": "What is 2 + 3?"}]})
            full.append((r.status_code, time.perf_counter() - t0, r.headers.get("retry-after")))
        for task in fill:
            task.cancel()
        await asyncio.gather(*fill, return_exceptions=True)
    while await asyncio.to_thread(lambda: metric(url, "kvprobe_requests_waiting") + metric(url, "kvprobe_requests_running")) > 0 \
            and time.time() < deadline + 60:
        await asyncio.sleep(0.1)
    refused = [t for s, t, _ in full if s == 429]
    return {"probes": probes, "refused_429": len(refused), "with_retry_after": sum(s == 429 and ra is not None for s, _, ra in full),
            "max_s": round(max(refused), 4) if refused else None, "p50_s": round(pct(refused, 0.5), 4) if refused else None}


async def short_behind_long(url: str, model: str, long_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        short = {"model": model + ":slow", "messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 8}
        alone = (await one(client, url, short))["e2e"]
        long = asyncio.create_task(one(client, url, {"model": model + ":slow", "max_tokens": long_tokens, "messages": [
            {"role": "user", "content": "Explain step by step how to compute 37 * 43 - 19."}]}))
        await asyncio.sleep(0.3)
        behind = (await one(client, url, short))["e2e"]
        await long
    return {"short_alone_s": round(alone, 3), "short_behind_long_s": round(behind, 3),
            "short_behind_long_over_alone": round(behind / alone, 3)}


class InProcess:
    """The same prompts one by one through ``KVProbeGenerator.generate`` in this process (loaded once, warmed up)."""

    def __init__(self, generator: str, policy: str, max_tokens: int, dtype: str | None):
        from kvprobe.steering import KVProbeGenerator

        self.gen, self.policy, self.max_tokens = KVProbeGenerator.from_pretrained(generator, dtype=dtype), policy, max_tokens
        self.gen.generate("What is 1 + 1?", policy, max_new_tokens=max_tokens)  # warm-up, as the server's first request

    def run(self, questions: list[str]) -> dict:
        gen = self.gen
        t0 = time.perf_counter()
        results = [gen.generate([{"role": "user", "content": q}], self.policy, max_new_tokens=self.max_tokens) for q in questions]
        wall = time.perf_counter() - t0
        return {"wall_s": round(wall, 3), "texts": [r.text for r in results], "source": gen.lm.source, "dtype": gen.lm.spec.dtype,
                "steering_share": round(sum(r.probe_seconds for r in results) / sum(r.seconds for r in results), 5),
                "completion_tokens": sum(len(r.token_ids) for r in results)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generator", default="smollm2", help="a generator folder or alias")
    p.add_argument("--policy", default="route")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-waiting", type=int, default=16)
    p.add_argument("--dtype", default=None, help="the model's dtype in every server and in process (default: the folder's)")
    p.add_argument("--pairs", type=int, default=3, help="alternated server / in-process passes for the overhead")
    p.add_argument("--fill-tokens", type=int, default=1024, help="the token cap of the requests that fill the server")
    p.add_argument("--long-tokens", type=int, default=192, help="the long request of the short-behind-long check")
    p.add_argument("--deadline", type=float, default=1800, help="seconds for the whole run")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers serve comparison")
    p.add_argument("--out", default="benchmarks/results/serve_load.json")
    a = p.parse_args(argv)
    if a.pairs < 1:
        p.error("--pairs must be >= 1: the overhead is their median")
    deadline = time.time() + a.deadline
    questions = prompts(a.requests)
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    warm = {"model": None, "messages": [{"role": "user", "content": "What is 1 + 1?"}], "max_tokens": 4}

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    name = a.generator if "/" not in a.generator else os.path.basename(os.path.normpath(a.generator))
    cmd = [sys.executable, "-m", "kvprobe", "serve", a.generator, "--port", str(port), "--policy", a.policy,
           "--max-batch-size", str(a.max_batch_size), "--max-waiting", str(a.max_waiting), "--batch-wait-ms", "10",
           "--log-level", "warning"] + (["--dtype", a.dtype] if a.dtype else [])
    mine = InProcess(a.generator, a.policy, a.max_tokens, a.dtype)
    with process(cmd, url, deadline, env):
        httpx.post(url + "/v1/chat/completions", json=warm | {"model": name}, timeout=600)
        before = metric(url, "kvprobe_probe_seconds_total")
        levels = [asyncio.run(level(url, name, questions, c, a.max_tokens, {})) for c in a.concurrency]
        levels_probe_s = metric(url, "kvprobe_probe_seconds_total") - before
        # The overhead: the server at concurrency 1 and the same prompts in process, alternated (this machine's speed
        # drifts by ~10% over minutes, so two runs minutes apart do not compare); the median ratio.
        pairs = []
        for _ in range(a.pairs):
            served = asyncio.run(level(url, name, questions, 1, a.max_tokens, {}))
            local = mine.run(questions)
            pairs.append({"server_s": served["wall_s"], "in_process_s": local["wall_s"], "same_text": served["texts"] == local["texts"]})
        over = asyncio.run(overload(url, name, 2 * (a.max_batch_size + a.max_waiting), a.max_tokens))
        over["when_full"] = asyncio.run(refused_when_full(url, name, a.max_batch_size + a.max_waiting, a.max_waiting, a.fill_tokens))
        cut = asyncio.run(short_behind_long(url, name, a.long_tokens))

    theirs = []
    if not a.no_transformers:
        tport = free_port()
        turl = f"http://127.0.0.1:{tport}"
        tcmd = ["transformers", "serve", local["source"], "--host", "127.0.0.1", "--port", str(tport), "--device", "cpu",
                "--dtype", local["dtype"], "--log-level", "warning"]
        with process(tcmd, turl, deadline, env):
            httpx.post(turl + "/v1/chat/completions", json=warm | {"model": local["source"]}, timeout=600)
            theirs = [asyncio.run(level(turl, local["source"], questions, c, a.max_tokens, {})) for c in a.concurrency]

    by_c = {r["concurrency"]: r for r in levels}
    top = 8 if 8 in by_c else max(by_c)
    c1 = by_c.get(1)
    same_text = all(p["same_text"] for p in pairs) and (c1 is None or c1["texts"] == local["texts"])
    ratios = sorted(p["server_s"] / p["in_process_s"] for p in pairs)
    figures = {
        "benchmark": "serve_load", "generator": a.generator, "policy": a.policy, "dtype": local["dtype"], "requests_per_level": a.requests,
        "max_tokens": a.max_tokens, "max_batch_size": a.max_batch_size, "max_waiting": a.max_waiting,
        "lost": sum(r["lost"] for r in levels), "failed": sum(r["failed"] for r in levels),
        "throughput_c8_over_c1": round(by_c[top]["tokens_per_s"] / c1["tokens_per_s"], 3) if c1 else None,
        "throughput_level": top,
        "overhead_c1_over_in_process": round(ratios[len(ratios) // 2], 4), "overhead_pairs": pairs,
        "greedy_text_equal_in_process_c1": same_text,
        "steering_share": local["steering_share"],
        "server_steering_share": round(levels_probe_s / sum(r["wall_s"] for r in levels), 5),
        "p95_ttft_s": {r["concurrency"]: r["p95_ttft_s"] for r in levels},
        "p95_e2e_s": {r["concurrency"]: r["p95_e2e_s"] for r in levels},
        "over_transformers_serve": None, "transformers_serve": None,
        "overload_5xx": over["5xx"], "overload_first_429_s": over["first_429_s"], "overload_full_429_max_s": over["when_full"]["max_s"],
        "overload": over,
        **cut,
        "levels": [{k: v for k, v in r.items() if k != "texts"} for r in levels],
    }
    if theirs:
        t_by_c = {r["concurrency"]: r for r in theirs}
        figures["over_transformers_serve"] = round(by_c[top]["tokens_per_s"] / t_by_c[top]["tokens_per_s"], 3)
        figures["over_transformers_serve_by_level"] = {c: round(by_c[c]["tokens_per_s"] / t_by_c[c]["tokens_per_s"], 3) for c in by_c}
        figures["transformers_serve"] = [{k: v for k, v in r.items() if k != "texts"} for r in theirs]
    return emit(figures, a.out)


if __name__ == "__main__":
    main()
