"""kvprobe serve: the real server (uvicorn on a free loopback port) driven by the real openai client, on a tiny
generator (difficulty, fast and slow correctness, switch probes); one integration test on SmolLM2's shipped folder."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from conftest import real_assets_available
from kvprobe.models import ModelSpec, load_model
from kvprobe.serve import ServeSettings, create_app
from kvprobe.serve.app import StopFilter
from kvprobe.serve.worker import Cancel, Job
from kvprobe.steering import DoneEvent, Hook, KVProbeGenerator

QUESTIONS = ["What is 3 + 4?", "What is 7 * 2 - 5?", "What is 9?", "What is 12 - 8 + 1?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(load, path="tiny", **settings):
    """A real uvicorn server in a thread; yields its base URL once /health says 200."""
    import uvicorn

    app = create_app(ServeSettings(path=path, **settings), load=load)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health").status_code == 200:
                break
        time.sleep(0.05)
    try:
        yield url, app
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def gen(trained):
    lm = load_model(ModelSpec(name=str(trained["model"])))
    root = trained["root"]
    return KVProbeGenerator.from_probes(lm, root / "difficulty", [root / "correctness", root / "correctness_fast"],
                                        switch=root / "switch")


@pytest.fixture(scope="module")
def server(gen):
    with serving(lambda: gen, batch_wait_ms=300, max_batch_size=8) as (url, app):
        yield url, app


def client(url, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, **kw)


def chat(q):
    return [{"role": "user", "content": q}]


def metric(url: str, name: str, labels: str = "") -> float:
    """A metric's value from /metrics (0 when absent)."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + (("{" + labels + "}") if labels else "") + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("policy", ["fast", "slow", "route", "route+switch", "verify", "route+verify"])
def test_greedy_answers_equal_in_process_alone_and_streamed(server, gen, policy):
    url, _ = server
    c = client(url)
    for q in QUESTIONS[:2]:
        expected = gen.generate(chat(q), policy)
        r = c.chat.completions.create(model=f"tiny:{policy}", messages=chat(q), temperature=0)
        choice = r.choices[0]
        assert choice.message.content == expected.text
        info = choice.model_extra["kvprobe"]
        assert info["policy"] == policy and info["mode"] == expected.mode and info["final_mode"] == expected.final_mode
        assert info["tokens"] == expected.tokens and info["escalated"] == expected.escalated
        assert info["confidence"] == pytest.approx(expected.confidence)
        assert r.usage.completion_tokens == len(expected.token_ids)
        assert r.usage.prompt_tokens == expected.prompt_tokens
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.system_fingerprint.startswith("fp_") and r.model == f"tiny:{policy}"
        chunks = list(c.chat.completions.create(model="tiny", messages=chat(q), stream=True,
                                                stream_options={"include_usage": True}, extra_body={"kvprobe": {"policy": policy}}))
        assert len({ch.id for ch in chunks}) == 1
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == expected.text
        first, last = chunks[0].choices[0], [ch for ch in chunks if ch.choices][-1].choices[0]
        assert first.delta.role == "assistant" and first.model_extra["kvprobe"]["policy"] == policy
        if policy.startswith("route"):
            assert first.model_extra["kvprobe"]["route_score"] == pytest.approx(expected.route_score)
        assert last.finish_reason in ("stop", "length") and last.model_extra["kvprobe"]["tokens"] == expected.tokens
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_concurrent_requests_decode_as_one_batch_and_equal_in_process(server, gen):
    url, _ = server
    expected = [gen.generate(chat(q), "route").text for q in QUESTIONS]
    batches = metric(url, "kvprobe_batch_rows_count")

    async def ask():
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        rs = await asyncio.gather(*[c.chat.completions.create(model="tiny:route", messages=chat(q)) for q in QUESTIONS])
        return [r.choices[0].message.content for r in rs]

    assert asyncio.run(ask()) == expected
    assert metric(url, "kvprobe_batch_rows_count") - batches < len(QUESTIONS)  # at least two requests shared a batch


def test_completions_n_seed_stop_and_length(server, gen):
    url, _ = server
    c = client(url)
    one = c.completions.create(model="tiny:slow", prompt=QUESTIONS[0], temperature=0.9, seed=3, max_tokens=12)
    two = c.completions.create(model="tiny:slow", prompt=QUESTIONS[0], n=3, temperature=0.9, seed=3, max_tokens=12)
    again = c.completions.create(model="tiny:slow", prompt=QUESTIONS[0], n=3, temperature=0.9, seed=3, max_tokens=12)
    assert [x.text for x in two.choices] == [x.text for x in again.choices]  # seeded: reproducible
    assert two.choices[0].text == one.choices[0].text  # copy 0 draws with the seed, as alone
    assert len({x.text for x in two.choices}) > 1
    assert two.usage.prompt_tokens == one.usage.prompt_tokens  # one prefill for the three copies
    greedy = gen.generate(QUESTIONS[1], "slow", max_new_tokens=3)
    r = c.completions.create(model="tiny:slow", prompt=QUESTIONS[1], max_tokens=3)
    assert r.choices[0].text == greedy.text and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    full = gen.generate(QUESTIONS[1], "slow").text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), full
    cut = full[: full.find(stop)]
    r = c.completions.create(model="tiny:slow", prompt=QUESTIONS[1], stop=[stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model="tiny:slow", prompt=QUESTIONS[1], stop=stop, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == cut


def test_stop_filter_never_sends_a_stop_string():
    f = StopFilter(["END", "xyz"])
    out = [f.push(p) for p in ["ab", "cE", "N", "q", "EN", "D tail"]]
    assert out == ["ab", "c", "", "ENq", "", ""]  # "E", "EN" held while they could begin "END"
    assert f.stopped and f.push("more") == ""


@pytest.mark.parametrize("body, status, param", [
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ({"model": "tiny"}, 400, "messages"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": "hi"}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10 ** 7}, 400, "max_completion_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 99}, 400, "n"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "kvprobe": {"polcy": "fast"}}, 400, "kvprobe.polcy"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "kvprobe": {"policy": "bogus"}}, 400, "kvprobe.policy"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "kvprobe": {"budget": 0.123}}, 400, "kvprobe.budget"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "kvprobe": {"threshold": "nope"}}, 400, "kvprobe"),
    ({"model": "tiny:bogus", "messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 5000}]}, 400, "messages"),
])
def test_bad_requests_get_openai_errors_and_the_next_request_succeeds(server, body, status, param):
    url, _ = server
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]
    if "word " in json.dumps(body):
        assert error["code"] == "context_length_exceeded"
    ok = client(url).chat.completions.create(model="tiny:fast", messages=chat("What is 1 + 1?"))
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_malformed_json_unknown_route_and_ignored_fields(server, caplog):
    url, _ = server
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    with caplog.at_level("WARNING", logger="kvprobe.serve"):
        r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny:fast", "messages": chat("hi"), "vendor_x": 1}, timeout=60)
    assert r.status_code == 200 and "vendor_x" in caplog.text


def test_models_health_and_policies(server):
    url, _ = server
    models = client(url).models.list().data
    ids = [m.id for m in models]
    assert ids[0] == "tiny" and {"tiny:route", "tiny:verify", "tiny:route+switch", "tiny:sample"} <= set(ids)
    assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_api_key(gen):
    with serving(lambda: gen, api_key="sekret") as (url, _):
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": chat("hi")}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(url).models.list()
        ok = openai.OpenAI(base_url=url + "/v1", api_key="sekret").chat.completions.create(model="tiny:fast", messages=chat("hi"))
        assert ok.choices[0].message.content is not None
        assert httpx.get(url + "/health").status_code == 200  # health and metrics need no key


def test_loading_is_503_then_ready(gen):
    gate = threading.Event()

    def load():
        gate.wait(30)
        return gen

    import uvicorn

    app = create_app(ServeSettings(path="tiny"), load=load)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.get(url + "/health")
            break
        time.sleep(0.05)
    assert r.status_code == 503
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": chat("hi")})
    assert r.status_code == 503 and r.json()["error"]["code"] == "loading" and r.headers["retry-after"]
    gate.set()
    for _ in range(200):
        if httpx.get(url + "/health").status_code == 200:
            break
        time.sleep(0.05)
    assert client(url).chat.completions.create(model="tiny:fast", messages=chat("hi")).choices
    srv.should_exit = True


def test_a_full_queue_gets_429_at_once_and_no_5xx(gen):
    with serving(lambda: gen, max_waiting=2, max_batch_size=1, batch_wait_ms=0) as (url, _):
        async def flood():
            async with httpx.AsyncClient(timeout=120) as h:
                body = {"model": "tiny:slow", "messages": chat(QUESTIONS[1]), "max_tokens": 24}

                async def one():
                    t = time.perf_counter()
                    r = await h.post(url + "/v1/chat/completions", json=body)
                    return r, time.perf_counter() - t

                return await asyncio.gather(*[one() for _ in range(12)])

        results = asyncio.run(flood())
        codes = [r.status_code for r, _ in results]
        assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 2, codes  # at least the queue
        for r, seconds in results:
            if r.status_code == 429:
                assert r.headers["retry-after"] and r.json()["error"]["type"] == "rate_limit_error"
        assert metric(url, "kvprobe_request_errors_total", 'code="429"') == codes.count(429)


def test_metrics_are_exact_after_a_known_sequence(gen):
    with serving(lambda: gen) as (url, _):
        c = client(url)
        rs = [c.chat.completions.create(model="tiny:route", messages=chat(q)) for q in QUESTIONS[:3]]
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="tiny", messages=chat("hi"), max_tokens=0)
        chunks = list(c.chat.completions.create(model="tiny:verify", messages=chat(QUESTIONS[3]), stream=True,
                                                stream_options={"include_usage": True}))
        last = [ch for ch in chunks if ch.choices][-1].choices[0]
        infos = [r.choices[0].model_extra["kvprobe"] for r in rs] + [last.model_extra["kvprobe"]]
        reasons = [r.choices[0].finish_reason for r in rs] + [last.finish_reason]
        for reason in ("stop", "length"):
            assert metric(url, "kvprobe_request_success_total", f'finish_reason="{reason}"') == reasons.count(reason)
        assert metric(url, "kvprobe_request_errors_total", 'code="400"') == 1
        assert metric(url, "kvprobe_prompt_tokens_total") == sum(r.usage.prompt_tokens for r in rs) + chunks[-1].usage.prompt_tokens
        assert metric(url, "kvprobe_generation_tokens_total") == sum(sum(i["tokens"].values()) for i in infos)
        for mode in ("fast", "slow"):
            assert metric(url, "kvprobe_routes_total", f'mode="{mode}"') == sum(i["mode"] == mode for i in infos)
        assert metric(url, "kvprobe_escalations_total") == sum(i["escalated"] for i in infos)
        assert metric(url, "kvprobe_e2e_request_latency_seconds_count") == 4
        assert metric(url, "kvprobe_confidence_count", 'mode="fast"') + metric(url, "kvprobe_confidence_count", 'mode="slow"') == 4
        assert metric(url, "kvprobe_requests_running") == 0 and metric(url, "kvprobe_requests_waiting") == 0


def test_a_cancelled_row_stops_within_two_steps(gen):
    """The engine side of a client that goes away: its row decodes at most two more tokens, the other row as before."""
    loop = asyncio.new_event_loop()
    long = max(QUESTIONS[:2], key=lambda q: gen.generate(q, "slow", max_new_tokens=60).decoded_tokens)
    jobs = [Job(long, 1, "slow", {}, {}, None, loop), Job(QUESTIONS[2], 1, "slow", {}, {}, None, loop)]
    assert gen.generate(long, "slow", max_new_tokens=60).decoded_tokens >= 8

    class Trigger(Hook):
        def on_token(self, engine, state, blocks):
            row = next(r for r in state.rows if r.index == 0)
            if row.tokens["slow"] == 3:
                jobs[0].cancelled = True
            self.decoded = row.tokens["slow"]

    trigger = Trigger()
    done = {e.row: e.result for e in gen.stream([j.prompt for j in jobs], "slow", max_new_tokens=60, hooks=[trigger, Cancel(jobs)])
            if isinstance(e, DoneEvent)}
    assert 0 not in done and trigger.decoded <= 3 + 2  # no answer for a request nobody reads
    assert done[1].text == gen.generate(QUESTIONS[2], "slow", max_new_tokens=60).text
    loop.close()


def test_a_client_that_disconnects_mid_stream_frees_the_engine(gen):
    long = max(QUESTIONS, key=lambda q: gen.generate(chat(q), "slow", max_new_tokens=200).decoded_tokens)
    assert gen.generate(chat(long), "slow", max_new_tokens=200).decoded_tokens >= 8
    with serving(lambda: gen) as (url, _):
        with httpx.stream("POST", url + "/v1/chat/completions", json={
                "model": "tiny:slow", "messages": chat(long), "max_tokens": 200, "stream": True}) as r:
            for line in r.iter_lines():
                if '"content"' in line and '"content": ""' not in line:
                    break  # the first text: go away
        t = time.perf_counter()
        while metric(url, "kvprobe_requests_cancelled_total") < 1 and time.perf_counter() - t < 10:
            time.sleep(0.05)
        assert metric(url, "kvprobe_requests_cancelled_total") == 1
        assert metric(url, "kvprobe_request_success_total", 'finish_reason="stop"') == 0
        ok = client(url).chat.completions.create(model="tiny:fast", messages=chat("hi"))
        assert ok.choices[0].message.content is not None


def test_sigterm_drains_running_requests(trained, tmp_path):
    """The real command: a request accepted before SIGTERM still gets its answer; then the process exits."""
    lm = load_model(ModelSpec(name=str(trained["model"])))
    root = trained["root"]
    folder = KVProbeGenerator.from_probes(lm, root / "difficulty", [root / "correctness"]).save_pretrained(tmp_path / "gen")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvprobe", "serve", str(folder), "--port", str(port), "--log-level", "warning",
                             "--batch-wait-ms", "1500"],  # the request waits 1.5 s for company: SIGTERM lands then
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            time.sleep(0.1)
        out = {}

        def ask():
            out["r"] = httpx.post(url + "/v1/chat/completions", timeout=120, json={
                "model": "gen:slow", "messages": chat(QUESTIONS[1]), "max_tokens": 300})

        asker = threading.Thread(target=ask)
        asker.start()
        deadline = time.time() + 60  # the request is counted from its arrival: waiting, gathered into a batch, running
        while metric(url, "kvprobe_requests_waiting") + metric(url, "kvprobe_requests_running") < 1:
            assert time.time() < deadline and asker.is_alive(), "the request was never counted as waiting or running"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        asker.join(120)
        assert out["r"].status_code == 200 and out["r"].json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        proc.kill()


def test_serve_refuses_bad_options():
    r = subprocess.run([sys.executable, "-m", "kvprobe", "serve", "smollm2", "--max-batch-size", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--max-batch-size must be >= 1" in r.stderr
    r = subprocess.run([sys.executable, "-m", "kvprobe", "serve", "smollm2", "--policy", "oracle"], capture_output=True, text=True)
    assert r.returncode == 2 and "--policy" in r.stderr
    r = subprocess.run([sys.executable, "-m", "kvprobe", "serve", "smollm2", "--dtype", "float8"], capture_output=True, text=True)
    assert r.returncode == 2 and "--dtype must be one of float32, bfloat16, float16" in r.stderr


def test_dtype_loads_the_folder_in_that_dtype(trained, tmp_path):
    """``--dtype`` (ServeSettings.dtype) reaches from_pretrained: the folder's model answers in bfloat16, and
    /v1/models says so."""
    lm = load_model(ModelSpec(name=str(trained["model"])))
    root = trained["root"]
    folder = KVProbeGenerator.from_probes(lm, root / "difficulty", [root / "correctness"]).save_pretrained(tmp_path / "gen")
    with serving(None, path=str(folder), dtype="bfloat16") as (url, app):
        info = httpx.get(url + "/v1/models").json()["data"][0]["kvprobe"]
        assert info["dtype"] == "bfloat16" and app.state.server.gen.lm.model.dtype == torch.bfloat16
        r = client(url).chat.completions.create(model="gen:fast", messages=chat(QUESTIONS[0]), max_tokens=4)
        assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.integration
@pytest.mark.skipif(not real_assets_available(), reason="needs the SmolLM2 registry assets (scripts/setup.sh)")
def test_smollm2_served_equals_in_process():
    gen = KVProbeGenerator.from_pretrained("smollm2")
    q = "What is 17 * 3 - 4?"
    expected = gen.generate(chat(q), "route")
    with serving(lambda: gen) as (url, _):
        r = client(url).chat.completions.create(model="tiny:route", messages=chat(q))
        assert r.choices[0].message.content == expected.text
        assert r.choices[0].model_extra["kvprobe"]["mode"] == expected.mode


def test_a_short_request_joins_a_running_batch_and_finishes_first(gen):
    """Continuous batching: a short request (same policy, a smaller max_tokens) sent while a long one decodes joins
    its batch at the next step and is answered before the long one ends; both answers are the in-process ones. (Each forward is slowed by 30 ms so
    that the order does not depend on the machine.)"""
    lengths = {q: gen.generate(chat(q), "slow", max_new_tokens=200).decoded_tokens for q in QUESTIONS}
    long = max(lengths, key=lengths.get)
    assert lengths[long] >= 8
    expected_long = gen.generate(chat(long), "slow", max_new_tokens=200).text
    expected_short = gen.generate(chat(QUESTIONS[2]), "slow", max_new_tokens=2).text
    slow_down = gen.lm.model.register_forward_pre_hook(lambda module, args: time.sleep(0.03))
    ended = {}
    try:
        with serving(lambda: gen, batch_wait_ms=0) as (url, _):
            def ask_long():
                with httpx.stream("POST", url + "/v1/chat/completions", timeout=120, json={
                        "model": "tiny:slow", "messages": chat(long), "max_tokens": 200, "stream": True}) as r:
                    text = ""
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            for c in json.loads(line[6:])["choices"]:
                                text += c["delta"].get("content") or ""
                                started.set()
                ended["long"] = (time.perf_counter(), text)

            started = threading.Event()
            thread = threading.Thread(target=ask_long)
            thread.start()
            assert started.wait(60)
            short = client(url).chat.completions.create(model="tiny:slow", messages=chat(QUESTIONS[2]), max_tokens=2)
            ended["short"] = time.perf_counter()
            thread.join(120)
            joined = metric(url, "kvprobe_batch_rows_count")
    finally:
        slow_down.remove()
    assert ended["short"] < ended["long"][0] and joined == 1  # one batch: the short request joined the long one's
    assert short.choices[0].message.content == expected_short and ended["long"][1] == expected_long


def test_requests_with_different_sampling_settings_share_a_batch(server, gen):
    """Per-row sampling settings: a greedy request and two seeded sampled ones (other temperatures and top_p) decode
    in one batch; each answers what it answers alone."""
    url, _ = server
    c = client(url)
    asks = [{"temperature": 0}, {"temperature": 0.7, "top_p": 0.9, "seed": 1}, {"temperature": 1.3, "seed": 2}]
    alone = [c.chat.completions.create(model="tiny:slow", messages=chat(QUESTIONS[1]), max_tokens=12, **a).choices[0].message.content
             for a in asks]
    assert alone[0] == gen.generate(chat(QUESTIONS[1]), "slow", max_new_tokens=12).text
    batches = metric(url, "kvprobe_batch_rows_count")

    async def together():
        ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        rs = await asyncio.gather(*[ac.chat.completions.create(model="tiny:slow", messages=chat(QUESTIONS[1]), max_tokens=12, **a)
                                    for a in asks])
        return [r.choices[0].message.content for r in rs]

    assert asyncio.run(together()) == alone
    assert metric(url, "kvprobe_batch_rows_count") - batches < len(asks)  # they shared a batch
