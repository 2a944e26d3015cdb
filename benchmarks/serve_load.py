"""kvprobe serve under load, against the same prompts in process and through `transformers serve`.

    python benchmarks/serve_load.py --dtype bfloat16         # SmolLM2's shipped generator, 13 min on 2 cores (fp32: 19)
    python benchmarks/serve_load.py --generator FOLDER --requests 2 --concurrency 1 2 --no-transformers   # reduced

Everything runs against 127.0.0.1 only, with a fixed number of requests per level and a global deadline. Three
servers run side by side, each idle while another answers: `kvprobe serve` (greedy, the chosen policy, default
settings) and `transformers serve` on the same base model folder and dtype, on its default path and with its
continuous batching. transformers serve does not route, so it is sent the chats the generator answered in (the
question with the instruction of the mode the router chose): both decode the same text, and kvprobe also routes
and scores every answer. This machine's speed drifts by ~10% over minutes, so nothing is compared across minutes:
at concurrency 1 every request goes to kvprobe serve, to `KVProbeGenerator.generate` in this process and to both
transformers serve paths in turn before the next request (`--passes` passes, the order rotating); at the other
concurrencies the servers take turns level by level, `--passes` rounds, and each round's ratio is taken before the
median. Then an overload pass sends twice the server's capacity (batch + queue) at once on connections opened
beforehand: no 5xx, and when the first and the last 429 come back; then the server is filled with long requests and
single requests are timed from their own send to their 429. Then a short request (8 tokens) is timed alone and
sent 0.3 s after a long one (same policy, `--long-tokens`): with continuous batching it joins the long one's batch.

Figures: `lost` (no answer at all), `failed` (an error status outside the overload pass), completion tokens/s per
level, p50/p95 time to first token and end to end, `throughput_c8_over_c1`, `overhead_c1_over_in_process` (kvprobe
serve's time over the in-process time, summed over the interleaved requests), `steering_share` (probe seconds /
wall, in process), `server_steering_share` (the server's probe seconds / its time in the levels),
`over_transformers_serve` (kvprobe tokens/s over the faster transformers serve path's, at each concurrency: the
lowest), `transformers_serve_same_text`, `overload_5xx`, `overload_first_429_s`, `overload_last_429_s`,
`overload_full_429_max_s`, `short_behind_long_over_alone`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from typing import Callable

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
    """A server process, ready once GET /health says 200."""
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


def summary(runs: list[dict], concurrency: int, requests: int, seconds: float) -> dict:
    """Figures of ``runs`` (``one``'s records) that took ``seconds`` in all: tokens/s, p50/p95 TTFT and end to end."""
    ok = [r for r in runs if r["status"] == 200]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None] or [float("nan")]
    e2e = [r["e2e"] for r in ok] or [float("nan")]
    tokens = sum(r["tokens"] for r in ok)
    return {"concurrency": concurrency, "requests": requests, "passes": len(runs) // requests,
            "lost": sum(r["status"] is None for r in runs), "failed": sum(r["status"] not in (None, 200) for r in runs),
            "wall_s": round(seconds, 3), "completion_tokens": tokens, "tokens_per_s": round(tokens / seconds, 3),
            "p50_ttft_s": round(pct(ttft, 0.5), 4), "p95_ttft_s": round(pct(ttft, 0.95), 4),
            "p50_e2e_s": round(pct(e2e, 0.5), 4), "p95_e2e_s": round(pct(e2e, 0.95), 4), "texts": [r["text"] for r in runs]}


def body(model: str, chat: list[dict], max_tokens: int) -> dict:
    return {"model": model, "messages": chat, "max_tokens": max_tokens, "temperature": 0}


async def level(url: str, model: str, chats: list[list[dict]], concurrency: int, max_tokens: int) -> dict:
    """Every chat once, ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def ask(chat):
            async with gate:
                return await one(client, url, body(model, chat, max_tokens))

        t0 = time.perf_counter()
        runs = await asyncio.gather(*[ask(c) for c in chats])
        wall = time.perf_counter() - t0
    return summary(runs, concurrency, len(chats), wall)


def rotated(names: list[str], k: int) -> list[str]:
    """``names`` rotated by ``k``: the order of pass (or round) ``k``, so that no target always goes first."""
    k %= len(names)
    return names[k:] + names[:k]


async def one_by_one(targets: dict[str, Callable], requests: int, passes: int) -> dict[str, list[dict]]:
    """Concurrency 1, interleaved request by request: request i goes to every target in turn before request i + 1
    (the order rotating with each pass), so that the machine's drift over minutes falls on every target alike.
    ``targets``: name -> async function of the request's index returning ``one``'s record."""
    runs = {n: [] for n in targets}
    for p in range(passes):
        for i in range(requests):
            for n in rotated(list(targets), p):
                runs[n].append(await targets[n](i))
    return runs


async def overload(url: str, model: str, count: int, max_tokens: int) -> dict:
    """``count`` non-streamed requests at once, as wrk sends them: written in one go on ``count`` connections opened
    beforehand (an HTTP client in Python, building them one by one on these same 2 cores beside a busy server, takes
    longer to send 64 requests than the server takes to refuse them). Statuses, and when the first and the last 429
    came back, from the burst's start."""
    parts = urllib.parse.urlsplit(url)
    conns = [await asyncio.open_connection(parts.hostname, parts.port) for _ in range(count)]
    requests = []
    for i in range(count):
        payload = json.dumps({"model": model, "messages": [{"role": "user", "content": f"What is {i} + {i}?"}],
                              "max_tokens": max_tokens}).encode()
        requests.append(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    t0 = time.perf_counter()
    for (_, writer), request in zip(conns, requests):
        writer.write(request)

    async def answer(reader: asyncio.StreamReader) -> tuple[int | None, float, dict]:
        try:
            status = int((await reader.readline()).split()[1])
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                key, _, value = line.decode().partition(":")
                headers[key.strip().lower()] = value.strip()
            seconds = time.perf_counter() - t0
            await reader.readexactly(int(headers.get("content-length", 0)))
            return status, seconds, headers
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            return None, time.perf_counter() - t0, {}

    runs = await asyncio.gather(*[answer(reader) for reader, _ in conns])
    for _, writer in conns:
        writer.close()
    refused = [t for s, t, _ in runs if s == 429]
    return {"requests": count, "ok": sum(s == 200 for s, _, _ in runs), "rejected_429": len(refused),
            "with_retry_after": sum(s == 429 and "retry-after" in h for s, _, h in runs),
            "5xx": sum(s is not None and s >= 500 for s, _, _ in runs), "lost": sum(s is None for s, _, _ in runs),
            "first_429_s": round(min(refused), 4) if refused else None, "last_429_s": round(max(refused), 4) if refused else None}


async def idle(url: str, limit: float = 120) -> None:
    """Until the server has no request running or waiting."""
    deadline = time.time() + limit
    while await asyncio.to_thread(lambda: metric(url, "kvprobe_requests_waiting") + metric(url, "kvprobe_requests_running")) > 0 \
            and time.time() < deadline:
        await asyncio.sleep(0.05)


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
    await idle(url)
    refused = [t for s, t, _ in full if s == 429]
    return {"probes": probes, "refused_429": len(refused), "with_retry_after": sum(s == 429 and ra is not None for s, _, ra in full),
            "max_s": round(max(refused), 4) if refused else None, "p50_s": round(pct(refused, 0.5), 4) if refused else None}


async def short_behind_long(url: str, model: str, long_tokens: int, trials: int) -> dict:
    """A short request (8 tokens) alone, then sent 0.3 s after a long one (``long_tokens``), ``trials`` times
    alternated; the long one hangs up once the short one is answered. Medians."""
    short = {"model": model + ":slow", "messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 8}
    long = {"model": model + ":slow", "max_tokens": long_tokens, "messages": [
        {"role": "user", "content": "Explain step by step how to compute 37 * 43 - 19."}]}
    alone, behind = [], []
    async with httpx.AsyncClient(timeout=600) as client:
        for _ in range(trials):
            alone.append((await one(client, url, short))["e2e"])
            first = asyncio.create_task(one(client, url, long))
            await asyncio.sleep(0.3)
            behind.append((await one(client, url, short))["e2e"])
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            await idle(url)
    a, b = pct(alone, 0.5), pct(behind, 0.5)
    return {"short_alone_s": round(a, 3), "short_behind_long_s": round(b, 3), "short_behind_long_over_alone": round(b / a, 3),
            "short_trials": {"alone_s": [round(x, 3) for x in alone], "behind_long_s": [round(x, 3) for x in behind]}}


class InProcess:
    """The same prompts through ``KVProbeGenerator.generate`` in this process (loaded once, warmed up)."""

    def __init__(self, generator: str, policy: str, max_tokens: int, dtype: str | None):
        from kvprobe.steering import KVProbeGenerator

        self.gen, self.policy, self.max_tokens = KVProbeGenerator.from_pretrained(generator, dtype=dtype), policy, max_tokens
        self.gen.generate("What is 1 + 1?", policy, max_new_tokens=max_tokens)  # warm-up, as the server's first request

    def one(self, question: str) -> dict:
        """``one``'s record for ``question`` answered in process (no time to first token: not streamed), with the
        probes' seconds and the chat it was answered in."""
        t0 = time.perf_counter()
        r = self.gen.generate([{"role": "user", "content": question}], self.policy, max_new_tokens=self.max_tokens)
        return {"status": 200, "ttft": None, "e2e": time.perf_counter() - t0, "tokens": len(r.token_ids), "text": r.text,
                "probe_s": r.probe_seconds, "seconds": r.seconds, "answered_in": self.chat_in(question, r.final_mode)}

    def chat_in(self, question: str, mode: str) -> list[dict]:
        """The chat the generator answered ``question`` in: the user's message with ``mode``'s instruction (what a
        server without routing must be sent to decode the same text)."""
        from kvprobe.prompts import with_instruction

        spec = copy.deepcopy(self.gen.prompt)
        spec.mode = mode
        return with_instruction([{"role": "user", "content": question}], spec, self.gen.lm.tokenizer)


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
    p.add_argument("--passes", type=int, default=3, help="interleaved passes at concurrency 1, rounds at the others")
    p.add_argument("--fill-tokens", type=int, default=1024, help="the token cap of the requests that fill the server")
    p.add_argument("--long-tokens", type=int, default=192, help="the long request of the short-behind-long check")
    p.add_argument("--trials", type=int, default=5, help="short-behind-long trials (medians)")
    p.add_argument("--deadline", type=float, default=1800, help="seconds for the whole run")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers serve comparison")
    p.add_argument("--out", default="benchmarks/results/serve_load.json")
    a = p.parse_args(argv)
    if a.passes < 1:
        p.error("--passes must be >= 1")
    deadline = time.time() + a.deadline
    questions = prompts(a.requests)
    chats = [[{"role": "user", "content": q}] for q in questions]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    warm = {"messages": [{"role": "user", "content": "What is 1 + 1?"}], "max_tokens": 4}

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    name = a.generator if "/" not in a.generator else os.path.basename(os.path.normpath(a.generator))
    cmd = [sys.executable, "-m", "kvprobe", "serve", a.generator, "--port", str(port), "--policy", a.policy,
           "--max-batch-size", str(a.max_batch_size), "--max-waiting", str(a.max_waiting), "--log-level", "warning"] \
        + (["--dtype", a.dtype] if a.dtype else [])
    mine = InProcess(a.generator, a.policy, a.max_tokens, a.dtype)
    answered = [mine.one(q) for q in questions]  # the chats the generator answers in: what transformers serve is sent
    source, dtype = mine.gen.lm.source, mine.gen.lm.spec.dtype
    with contextlib.ExitStack() as servers:
        servers.enter_context(process(cmd, url, deadline, env))
        httpx.post(url + "/v1/chat/completions", json=warm | {"model": name}, timeout=600)
        # transformers serve, on its default path and with its continuous batching (a paged cache sized for this
        # run), is sent the chats the generator answered in (its routing given for free), so both decode the same
        # text; it runs beside kvprobe serve, idle while the other answers, so that their passes can alternate.
        theirs: dict[str, str] = {}
        for path, flags in ([] if a.no_transformers else [("default", []), ("continuous_batching", [
                "--continuous-batching", "--cb-num-blocks", "512", "--cb-block-size", "32"])]):
            turl = f"http://127.0.0.1:{free_port()}"
            servers.enter_context(process(["transformers", "serve", source, "--host", "127.0.0.1", "--port", turl.rsplit(":", 1)[1],
                                           "--device", "cpu", "--dtype", dtype, "--log-level", "warning"] + flags, turl, deadline, env))
            httpx.post(turl + "/v1/chat/completions", json=warm | {"model": source}, timeout=600)
            theirs[path] = turl
        probe_s0 = metric(url, "kvprobe_probe_seconds_total")

        async def at_one() -> dict[str, list[dict]]:
            async with httpx.AsyncClient(timeout=600) as client:  # one pool, kept alive, as a client would
                def served(base: str, model: str, chat_of: Callable[[int], list[dict]]) -> Callable:
                    return lambda i: one(client, base, body(model, chat_of(i), a.max_tokens))

                async def in_process(i: int) -> dict:
                    return mine.one(questions[i])

                targets = {"kvprobe": served(url, name, lambda i: chats[i]), "in_process": in_process} | {
                    path: served(turl, source, lambda i: answered[i]["answered_in"]) for path, turl in theirs.items()}
                return await one_by_one(targets, len(questions), a.passes)

        c1 = asyncio.run(at_one()) if 1 in a.concurrency else {}
        # the other levels: kvprobe and each transformers serve path in turn, ``passes`` rounds
        rounds: dict[int, list[dict[str, dict]]] = {c: [] for c in a.concurrency if c != 1}
        for r in range(a.passes):
            for c in rounds:
                rounds[c].append({n: asyncio.run(level(url, name, chats, c, a.max_tokens)) if n == "kvprobe" else
                                  asyncio.run(level(theirs[n], source, [x["answered_in"] for x in answered], c, a.max_tokens))
                                  for n in rotated(["kvprobe"] + list(theirs), r)})
        kv_seconds = sum(x["e2e"] for x in c1.get("kvprobe", [])) + sum(p["kvprobe"]["wall_s"] for ps in rounds.values() for p in ps)
        server_probe_s = metric(url, "kvprobe_probe_seconds_total") - probe_s0
        over = asyncio.run(overload(url, name, 2 * (a.max_batch_size + a.max_waiting), a.max_tokens))
        over["when_full"] = asyncio.run(refused_when_full(url, name, a.max_batch_size + a.max_waiting, a.max_waiting, a.fill_tokens))
        cut = asyncio.run(short_behind_long(url, name, a.long_tokens, a.trials))

    n = len(questions)

    def seconds(runs: list[dict], k: int | None = None) -> float:  # end to end, summed over pass k (or all passes)
        return sum(x["e2e"] for x in (runs if k is None else runs[k * n:(k + 1) * n]))

    def rate(runs: list[dict], k: int) -> float:  # pass k's tokens/s
        return sum(x["tokens"] for x in runs[k * n:(k + 1) * n]) / seconds(runs, k)

    levels, versus = {}, {}
    if c1:
        levels[1] = summary(c1["kvprobe"], 1, n, seconds(c1["kvprobe"]))
        if theirs:
            t = {p: summary(c1[p], 1, n, seconds(c1[p])) for p in theirs}
            passes = [rate(c1["kvprobe"], k) / max(rate(c1[p], k) for p in theirs) for k in range(a.passes)]
            versus[1] = {"kvprobe_over_best": round(levels[1]["tokens_per_s"] / max(x["tokens_per_s"] for x in t.values()), 3),
                         "passes": [round(x, 3) for x in passes]} | {
                p: {k: v for k, v in x.items() if k != "texts"} for p, x in t.items()}
    for c, ps in rounds.items():
        mid = sorted(ps, key=lambda p: p["kvprobe"]["tokens_per_s"])[len(ps) // 2]
        levels[c] = mid["kvprobe"] | {"lost": sum(p["kvprobe"]["lost"] for p in ps), "failed": sum(p["kvprobe"]["failed"] for p in ps)}
        if theirs:
            ratios = sorted(p["kvprobe"]["tokens_per_s"] / max(p[x]["tokens_per_s"] for x in theirs) for p in ps)
            versus[c] = {"kvprobe_over_best": round(ratios[len(ratios) // 2], 3), "rounds": [round(x, 3) for x in ratios]} | {
                x: {k: v for k, v in mid[x].items() if k != "texts"} for x in theirs}
    top = 8 if 8 in levels else max(levels)
    pass_ratios = [seconds(c1["kvprobe"], k) / seconds(c1["in_process"], k) for k in range(a.passes)] if c1 else []
    local = c1.get("in_process") or answered
    figures = {
        "benchmark": "serve_load", "generator": a.generator, "policy": a.policy, "dtype": dtype, "requests_per_level": n,
        "passes": a.passes, "max_tokens": a.max_tokens, "max_batch_size": a.max_batch_size, "max_waiting": a.max_waiting,
        "lost": sum(r["lost"] for r in levels.values()), "failed": sum(r["failed"] for r in levels.values()),
        "throughput_c8_over_c1": round(levels[top]["tokens_per_s"] / levels[1]["tokens_per_s"], 3) if c1 else None,
        "throughput_level": top,
        "overhead_c1_over_in_process": round(seconds(c1["kvprobe"]) / seconds(c1["in_process"]), 4) if c1 else None,
        "overhead_passes": [round(x, 4) for x in pass_ratios],
        "greedy_text_equal_in_process_c1": all(s["text"] == m["text"] for s, m in zip(c1.get("kvprobe", []), c1.get("in_process", []))),
        "steering_share": round(sum(x["probe_s"] for x in local) / sum(x["seconds"] for x in local), 5),
        "server_steering_share": round(server_probe_s / kv_seconds, 5) if kv_seconds else None,
        "p95_ttft_s": {c: r["p95_ttft_s"] for c, r in levels.items()},
        "p95_e2e_s": {c: r["p95_e2e_s"] for c, r in levels.items()},
        "over_transformers_serve": min(v["kvprobe_over_best"] for v in versus.values()) if versus else None,
        "over_transformers_serve_by_level": {c: v["kvprobe_over_best"] for c, v in versus.items()} or None,
        "transformers_serve_same_text": {p: round(sum(t["text"] == m["text"] for t, m in zip(c1[p], c1["in_process"]))
                                                  / len(c1["in_process"]), 3) for p in theirs} if c1 and theirs else None,
        "transformers_serve": versus or None,
        "overload_5xx": over["5xx"], "overload_first_429_s": over["first_429_s"], "overload_last_429_s": over["last_429_s"],
        "overload_full_429_max_s": over["when_full"]["max_s"], "overload": over,
        **cut,
        "levels": [{k: v for k, v in r.items() if k != "texts"} for r in levels.values()],
    }
    return emit(figures, a.out)


if __name__ == "__main__":
    main()
