"""KVProbeGenerator on tiny models: live features equal captured ones, cache reuse equals fresh prefill, accounting."""

import json

import pytest
import torch

from conftest import common_args, real_assets_available
from kvprobe.features import window_kv
from kvprobe import switching
from kvprobe.export import ProbeMismatch
from kvprobe.fit import main
from kvprobe.models import ModelSpec, load_model
from kvprobe.steering import (DecodeEngine, DoneEvent, EscalateEvent, GenerationConfig, Hook, KVProbeGenerator, RouteEvent,
                              SteeringSpec, SwitchEvent, TextEvent, cue_block)
from kvprobe.store import CaptureStore

QUESTIONS = ["What is 3 + 4?", "What is 7 * 2 - 5?", "What is 9?"]


@pytest.fixture(scope="module")
def gen(trained):
    lm = load_model(ModelSpec(name=str(trained["model"])))
    root = trained["root"]
    return KVProbeGenerator.from_probes(lm, root / "difficulty", [root / "correctness", root / "correctness_fast"], switch=root / "switch")


def forced(gen, **steering):
    """The same generator with a route threshold that sends everything to slow, and the given steering."""
    return KVProbeGenerator(gen.lm, gen.difficulty, gen.correctness, gen.switch, SteeringSpec(threshold=-1.0, **steering))


class Widths(Hook):
    """Records the width of every block the engine feeds."""

    def __init__(self):
        self.seen = []

    def on_forward(self, engine, state, blocks, fed):
        self.seen.append(max(map(len, blocks)))


def greedy(lm, ids, n):
    out = lm.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


def test_live_features_equal_captured(gen, trained):
    """The route score and each mode's answer confidence computed live equal the probes applied to the capture's
    tensors: the fast-answer verifier (answer KV, mean max-probability and entropy) on fast answers, the slow
    probe (answer KV) on slow ones."""
    d = gen.difficulty
    for mode in ("fast", "slow"):
        where = next(p for p in (trained["root"] / "captures").iterdir() if p.name.startswith(f"arithmetic-{mode}"))
        shards, table = CaptureStore(where).open()
        rows = table.to_pylist()[:6]
        items = [r["question"] for r in rows]
        results = gen.generate(items, policy=mode)
        captured = {k: torch.cat([s[k] for s in shards])[:6].float() for k in ("prompt_kv", "response_kv")}
        if mode == "fast":
            live = gen.generate(items, policy="route")
            torch.testing.assert_close(torch.tensor([r.route_score for r in live]), d.predict({"prompt_kv": captured["prompt_kv"]}),
                                       atol=1e-4, rtol=1e-4)
        scores = {"max_prob": torch.tensor([r["max_prob"] for r in rows]), "neg_entropy": -torch.tensor([r["entropy"] for r in rows])}
        want = gen.correctness[mode].predict({"response_kv": captured["response_kv"], "scores": scores})
        same = [i for i, r in enumerate(results) if r.decoded_tokens == rows[i]["gen_tokens"] and r.text == rows[i]["response"]]
        assert len(same) >= 5  # greedy on the same prompt; padding noise may flip a rare near-tie token
        torch.testing.assert_close(torch.tensor([results[i].confidence for i in same]), want[same], atol=1e-4, rtol=1e-4)
    assert gen.correctness["fast"].hparams.output_inputs and not gen.correctness["slow"].hparams.output_inputs


def test_live_switch_scores_equal_the_probe_on_captured_trajectories(gen, trained):
    """Every live switch score (ring buffer of the latest positions) equals the switch probe applied to the window
    the switch data builds from the capture's token_kv trajectory at the same decoded-token count."""
    slow = next(p for p in (trained["root"] / "captures").iterdir() if p.name.startswith("arithmetic-slow"))
    shards, table = CaptureStore(slow).open()
    rows = table.to_pylist()[:4]
    # probe every token from the first, never arm: every score is recorded, nothing switches
    g = forced(gen, switch_low=-1.0, switch_high=2.0, min_tokens=1, probe_every=1)
    live = g.generate([r["question"] for r in rows], policy="route+switch")
    offsets, token_kv = shards[0]["token_offsets"], shards[0]["token_kv"]
    p = gen.switch
    compared = 0
    for i, (row, r) in enumerate(zip(rows, live)):
        assert r.switched_at is None and [t for t, _ in r.switch_trace] == list(range(1, r.decoded_tokens))
        if r.text != row["response"]:
            continue  # padding noise flipped a near-tie token; the windows differ from there on
        windows = switching.trajectory_windows(token_kv[int(offsets[i]) : int(offsets[i + 1])].float(), g.switch_window)
        want = p.score(p(p.pooled_inputs(windows)))
        got = torch.tensor([score for _, score in r.switch_trace])
        torch.testing.assert_close(got, want[: len(got)], atol=1e-3, rtol=1e-3)
        compared += 1
    assert compared >= 3


def test_window_kv_reads_around_inner_padding():
    k = torch.arange(2 * 1 * 6 * 1, dtype=torch.float32).view(2, 1, 6, 1)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1]])
    w = window_kv([(k, -k)], mask, 3, [0])  # (batch, layers, 2, heads, width, dim)
    assert w[0, 0, 0, 0, :, 0].tolist() == [2.0, 4.0, 5.0]  # column 3 is padding inside the sequence
    assert w[1, 0, 1, 0, :, 0].tolist() == [-9.0, -10.0, -11.0]
    assert window_kv([(k, k)], mask, 6, [0])[0, 0, 0, 0, :, 0].tolist() == [0.0, 0.0, 1.0, 2.0, 4.0, 5.0]


def test_rerouted_prompt_reuses_prefix_and_equals_fresh_slow(gen):
    """Routed to slow after the fast prefill: the shared prefix comes from the cache, the tokens equal a fresh slow run."""
    routed = forced(gen).generate(QUESTIONS, policy="route")
    fresh = gen.generate(QUESTIONS, policy="slow")
    for q, r, f in zip(QUESTIONS, routed, fresh):
        assert r.mode == "slow" and r.token_ids == f.token_ids and r.text == f.text
        fast_ids, slow_ids = gen.prompt_ids(q, "fast"), gen.prompt_ids(q, "slow")
        shared = next(i for i, (a, b) in enumerate(zip(fast_ids, slow_ids)) if a != b)
        assert shared >= 8  # at least the template head and the question are shared
        assert r.prompt_tokens == len(fast_ids) + len(slow_ids) - shared  # only the differing suffix is prefilled again


def test_mixed_batch_routes_each_row_like_its_fixed_mode(gen):
    scores = [r.route_score for r in gen.generate(QUESTIONS, policy="route")]
    g = KVProbeGenerator(gen.lm, gen.difficulty, gen.correctness, steering=SteeringSpec(threshold=sorted(scores)[1]))
    routed = g.generate(QUESTIONS, policy="route")
    assert {r.mode for r in routed} == {"fast", "slow"}  # one batch, both groups
    for q, r in zip(QUESTIONS, routed):
        assert r.token_ids == gen.generate(q, policy=r.mode).token_ids


def test_forced_switch_continues_from_cache_like_a_fresh_prefill(gen):
    g = forced(gen, switch_low=2.0, switch_high=-1.0, min_tokens=2)  # arms at the 2nd slow token, fires at the 3rd
    r = g.generate(QUESTIONS[1], policy="route+switch")
    tok = gen.lm.tokenizer
    slow = g.generate(QUESTIONS[1], policy="slow").token_ids  # what it decodes without a switch
    assert (r.mode, r.final_mode, r.switched_at) == ("slow", "fast", 3) and r.switch_score < 2.0
    fed = 3 + r.cue_tokens  # the ids through the cue: two decoded, then the third decoded token and the cue
    assert r.token_ids[:2] == slow[:2] and r.cue_tokens >= 1
    assert tok.decode(r.token_ids[:fed]) == tok.decode(slow[:3]) + g.steering.answer_cue  # the text is what was cut + cue
    assert r.tokens["slow"] == 3 and r.tokens["fast"] == len(r.token_ids) - fed and r.decoded_tokens == len(r.token_ids) - r.cue_tokens
    prefix = gen.prompt_ids(QUESTIONS[1], "slow") + r.token_ids[:fed]
    after = r.token_ids[fed:]
    assert greedy(gen.lm, prefix, len(after)) == after  # a fresh prefill of the switched ids decodes the same tokens
    assert 0.0 <= r.confidence <= 1.0 and r.probe_seconds > 0


def test_cue_block_tokenises_the_switch_as_text(gen):
    """At a switch, the decoded token and the cue are fed as a fresh tokenisation of the text would have them; when
    that would change tokens already in the cache, the cue's own ids follow the token."""
    tok = gen.lm.tokenizer
    cue = "\n\nAnswer:"
    cue_ids = tok.encode(cue, add_special_tokens=False)
    for text in ["The answer is 12", "so 3 + 4 = 7.", "Then the answer is "]:
        ids = tok.encode(text, add_special_tokens=False)
        block = cue_block(tok, ids[-5:-1], ids[-1], cue)
        assert tok.decode(ids[-5:-1] + block) == tok.decode(ids[-5:]) + cue
        assert block == tok.encode(tok.decode(ids[-5:]) + cue, add_special_tokens=False)[4:] or block == [ids[-1]] + cue_ids
    merging = [t for t in range(len(tok)) if tok.decode([t]).isspace()]  # a whitespace token can merge with "\n\n"
    merged = [t for t in merging if cue_block(tok, [], t, cue) != [t] + cue_ids]
    for t in merged:
        assert tok.decode(cue_block(tok, [], t, cue)) == tok.decode([t]) + cue


@pytest.mark.skipif(not real_assets_available(), reason="needs the embedded SmolLM2 (scripts/setup.sh)")
def test_cue_block_on_the_real_tokenizer():
    """The case that made a live switch ramble on SmolLM2: an answer cut after "is " fed " ", "\n", "\n", "Answer",
    ":" - a sequence no tokenisation of the text gives (" \n" is one token there)."""
    from kvprobe.models import load_tokenizer, resolve

    tok = load_tokenizer(resolve("smollm2")[0])
    cue = "\n\nAnswer:"
    cue_ids = tok.encode(cue, add_special_tokens=False)
    ids = tok.encode("we need to find the difference. The answer is ", add_special_tokens=False)
    block = cue_block(tok, ids[-5:-1], ids[-1], cue)
    assert block != [ids[-1]] + cue_ids and tok.decode(block) == tok.decode(ids[-1:]) + cue
    assert ids[:-1] + block == tok.encode(tok.decode(ids) + cue, add_special_tokens=False)
    done = tok.encode("so the answer is 7.", add_special_tokens=False)
    assert cue_block(tok, done[-5:-1], done[-1], cue) == [done[-1]] + cue_ids  # "." and "\n\n" stay apart


def test_batching_with_left_padding_equals_one_by_one(gen):
    together = gen.generate(QUESTIONS, policy="slow")
    for q, r in zip(QUESTIONS, together):
        alone = gen.generate(q, policy="slow")
        assert r.token_ids == alone.token_ids and r.text == alone.text
        assert r.tokens == {"fast": 0, "slow": len(r.token_ids)} and r.prompt_tokens == len(gen.prompt_ids(q, "slow"))
        assert r.token_ids == greedy(gen.lm, gen.prompt_ids(q, "slow"), len(r.token_ids))  # the loop decodes as HF does


def test_switching_rows_in_a_batch_decode_as_one_by_one(gen):
    """A switch feeds its cue one token per step, so no row is ever padded inside its sequence by another's switch:
    each row of a batch decodes what it decodes alone."""
    g = forced(gen, switch_low=2.0, switch_high=-1.0, min_tokens=2)
    widths = Widths()
    together = [e.result for e in g.engine(g.hooks("route+switch", len(QUESTIONS)) + [widths]).run(QUESTIONS) if isinstance(e, DoneEvent)]
    assert widths.seen[0] > 1 and widths.seen[1] > 1 and set(widths.seen[2:]) == {1}  # fast prompt, slow suffix, then one position a step
    for q, r in zip(QUESTIONS, together):
        alone = g.generate(q, policy="route+switch")
        assert r.switched_at == alone.switched_at == 3 and r.token_ids == alone.token_ids and r.text == alone.text
        assert r.cue_tokens == alone.cue_tokens >= 1 and r.decoded_tokens == alone.decoded_tokens


def test_streaming_events(gen):
    g = forced(gen, switch_low=2.0, switch_high=-1.0, min_tokens=1)  # arms at the first probe, fires at the second
    events = list(g.stream(QUESTIONS[:2], policy="route+switch"))
    kinds = [type(e) for e in events]
    assert kinds[:2] == [RouteEvent, RouteEvent] and kinds.count(DoneEvent) == 2 and kinds.count(SwitchEvent) == 2
    for row in (0, 1):
        streamed = "".join(e.text for e in events if isinstance(e, TextEvent) and e.row == row)
        done = next(e.result for e in events if isinstance(e, DoneEvent) and e.row == row)
        assert streamed == done.text
        switch = next(i for i, e in enumerate(events) if isinstance(e, SwitchEvent) and e.row == row)
        assert events[switch].at == 2 and switch < kinds.index(DoneEvent)


def test_round_trip_mismatch_and_bad_input(gen, trained, tiny_models, tmp_path):
    folder = gen.save_pretrained(tmp_path / "gen")
    meta = json.loads((folder / "generator.json").read_text())
    assert meta["probes"] == {k: k for k in ("difficulty", "correctness", "correctness_fast", "switch")}
    again = KVProbeGenerator.from_pretrained(folder, model=gen.lm)
    assert again.difficulty.thresholds == gen.difficulty.thresholds and again.steering == gen.steering
    assert {m: p.card.prompt.mode for m, p in again.correctness.items()} == {"fast": "fast", "slow": "slow"}
    assert gen.steering.switch_low == gen.switch.thresholds["switch_low"]  # unset switch settings come from the export
    assert again.switch.thresholds == gen.switch.thresholds and again.switch_window == gen.switch_window
    a, b = gen.generate(QUESTIONS[0], policy="route"), again.generate(QUESTIONS[0], policy="route")
    assert a.token_ids == b.token_ids and a.route_score == pytest.approx(b.route_score)
    other = load_model(ModelSpec(name=str(tiny_models["qwen2"])))
    with pytest.raises(ProbeMismatch, match="not on"):
        KVProbeGenerator.from_pretrained(folder, model=other)
    with pytest.raises(ProbeMismatch, match="not on"):  # a plain transformers model is fingerprinted by its folder
        KVProbeGenerator.from_pretrained(folder, model=other.model, tokenizer=other.tokenizer)
    plain = KVProbeGenerator.from_pretrained(folder, model=gen.lm.model, tokenizer=gen.lm.tokenizer)
    assert plain.generate(QUESTIONS[0], policy="route").token_ids == a.token_ids
    with pytest.raises(ValueError, match="policy 'oracle' needs oracle_modes"):
        gen.generate(QUESTIONS, policy="oracle")
    with pytest.raises(ValueError, match="not one of"):
        gen.generate(QUESTIONS, policy="sometimes")
    no_switch = KVProbeGenerator(gen.lm, gen.difficulty, gen.correctness)
    with pytest.raises(ValueError, match="needs a switch probe"):
        no_switch.generate(QUESTIONS, policy="route+switch")
    slow_only = KVProbeGenerator(gen.lm, gen.difficulty, gen.correctness["slow"])
    with pytest.raises(ValueError, match="needs a correctness probe trained on fast answers"):
        slow_only.generate(QUESTIONS, policy="verify")
    with pytest.raises(ValueError, match="two correctness probes for slow answers"):
        KVProbeGenerator(gen.lm, gen.difficulty, [gen.correctness["slow"], gen.correctness["slow"]])
    with pytest.raises(ValueError, match="switch probe alone"):
        KVProbeGenerator.from_pretrained(trained["root"] / "switch", model=gen.lm)
    with pytest.raises(FileNotFoundError, match="neither generator.json nor probe.json"):
        KVProbeGenerator.from_pretrained(tmp_path)
    meta["steering"]["think_cue"] = "\nWait.\n"  # a setting this version does not know
    (folder / "generator.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"\['think_cue'\] are not SteeringSpec fields"):
        KVProbeGenerator.from_pretrained(folder, model=gen.lm)
    modes = ["slow", "fast", "slow"]
    oracle = gen.generate(QUESTIONS, policy="oracle", oracle_modes=modes)
    assert [r.mode for r in oracle] == modes


def test_switch_cost_benchmark_reduced(gen, tmp_path):
    from tests.test_benchmarks import load

    folder = gen.save_pretrained(tmp_path / "gen")
    out = tmp_path / "switch_cost.json"
    figures = load("switch_cost").main(["--generator", str(folder), "--n", "2", "--at", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == figures and figures["switched_items"] == 2
    assert figures["same_switch_point_every_item"] and figures["live_fewer_tokens_every_item"]
    assert figures["same_answer_after_the_cue"] == sum(p["same_answer"] for p in figures["per_switched_item"])


def test_window_kv_never_reads_padding_values():
    k = torch.ones(2, 1, 5, 1)
    k[0, :, :3] = float("nan")  # left padding may hold anything
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    w = window_kv([(k, k)], mask, 4, [0])
    assert torch.isfinite(w).all() and w[0, 0, 0, 0, :, 0].tolist() == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generator_on_gpu_matches_cpu(gen, trained):
    """The model sharded onto the GPU (device_map="auto"): probes move to its input device, and every policy gives
    the CPU run's answers, route scores, switches and confidences."""
    lm = load_model(ModelSpec(name=str(trained["model"]), device_map="auto"))
    assert lm.input_device.type == "cuda"
    root = trained["root"]
    on_gpu = KVProbeGenerator.from_probes(lm, root / "difficulty", root / "correctness", switch=root / "switch")
    assert next(on_gpu.difficulty.parameters()).device.type == "cuda"
    for policy in ("fast", "slow", "route", "route+switch"):
        for cpu, cuda in zip(gen.generate(QUESTIONS, policy=policy), on_gpu.generate(QUESTIONS, policy=policy)):
            assert cuda.token_ids == cpu.token_ids and cuda.mode == cpu.mode and cuda.switched_at == cpu.switched_at, policy
            assert cuda.route_score == pytest.approx(cpu.route_score, abs=1e-3) if cpu.route_score is not None else cuda.route_score is None
            assert cuda.confidence == pytest.approx(cpu.confidence, abs=1e-3)


def test_generate_gives_results_or_named_errors(gen):
    """Any arguments: results, or a ValueError that names the argument; never a raw KeyError or TypeError."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    text = st.text(max_size=12)
    prompt = st.one_of(text, st.integers(), st.none(), st.lists(st.dictionaries(st.sampled_from(["role", "content", "x"]),
                                                                                 st.one_of(text, st.integers()), max_size=2), max_size=2))
    caps = st.one_of(st.none(), st.integers(-1, 3), st.floats(0, 3), st.text(max_size=2),
                     st.dictionaries(st.sampled_from(["fast", "slow", "medium"]), st.one_of(st.integers(-1, 3), st.text(max_size=1)), max_size=2))

    @settings(max_examples=40, deadline=None)
    @given(prompts=st.one_of(prompt, st.lists(prompt, max_size=3)), policy=st.sampled_from(["fast", "slow", "route", "route+switch", "oracle", "sometimes"]),
           max_new_tokens=caps, oracle_modes=st.one_of(st.none(), st.lists(st.sampled_from(["fast", "slow", "medium"]), max_size=3)))
    def check(prompts, policy, max_new_tokens, oracle_modes):
        try:
            out = gen.generate(prompts, policy=policy, max_new_tokens=max_new_tokens, oracle_modes=oracle_modes)
        except ValueError:
            return
        results = out if isinstance(out, list) else [out]
        assert all(r.decoded_tokens >= 1 for r in results)

    check()


def test_a_prompt_longer_than_the_context_is_refused(gen):
    long = "1 + " * 600 + "1?"
    with pytest.raises(ValueError, match=r"prompt 0 is \d+ tokens in slow mode; with max_new_tokens 24 that is more than the model's 512 positions"):
        gen.generate(long, policy="slow")
    with pytest.raises(ValueError, match="max_new_tokens maps modes"):
        gen.generate(QUESTIONS[0], policy="fast", max_new_tokens=0)
    with pytest.raises(ValueError, match=r"oracle_modes: one 'fast'/'slow' per prompt, not \['medium'\]"):
        gen.generate([QUESTIONS[0]], policy="oracle", oracle_modes=["medium"])
    with pytest.raises(ValueError, match="chat message 0 must be a dict with string 'role' and 'content'"):
        gen.generate([{"role": "user"}], policy="fast")


class LengthRouter(Hook):
    """A policy written against the hook interface alone: every prompt starts fast; after the prefill, prompts longer
    than ``n`` tokens are moved to slow (the engine re-prompts them). It records which hooks ran, in order."""

    def __init__(self, n):
        self.n, self.calls = n, []

    def start_modes(self, prompts):
        self.calls.append("start_modes")
        return ["fast"] * len(prompts)

    def on_prefill(self, engine, state):
        self.calls.append("on_prefill")
        for r in state.rows:
            r.mode = "slow" if len(r.ids) > self.n else "fast"

    def on_forward(self, engine, state, blocks, fed):
        self.calls.append("on_forward")

    def on_token(self, engine, state, blocks):
        self.calls.append("on_token")

    def on_finish(self, engine, state):
        self.calls.append("on_finish")


def test_a_new_policy_needs_only_hooks(gen):
    lengths = [len(gen.prompt_ids(q, "fast")) for q in QUESTIONS]
    hook = LengthRouter(sorted(lengths)[1])
    config = GenerationConfig()  # the engine alone, as a user's policy would drive it
    events = list(DecodeEngine(gen.lm, gen.prompt_ids, [hook], config, config.caps(gen.max_new_tokens)).run(QUESTIONS))
    results = {e.row: e.result for e in events if isinstance(e, DoneEvent)}
    assert [results[i].mode for i in range(3)] == ["slow" if n > sorted(lengths)[1] else "fast" for n in lengths]
    for i, q in enumerate(QUESTIONS):  # a moved row decodes as a fresh prompt of its mode
        assert results[i].token_ids == gen.generate(q, policy=results[i].mode).token_ids
    calls = hook.calls
    assert calls[:3] == ["start_modes", "on_forward", "on_prefill"] and calls.count("on_finish") == 2  # two groups
    assert calls.index("on_token") > calls.index("on_prefill") and calls[-1] == "on_finish"


def test_sampling_parameters(gen):
    greedy_ids = gen.generate(QUESTIONS, policy="slow")
    top1 = gen.generate(QUESTIONS, policy="slow", do_sample=True, top_k=1, seed=3)
    assert [r.token_ids for r in top1] == [r.token_ids for r in greedy_ids]  # top_k 1 is greedy
    a = gen.generate(QUESTIONS, policy="slow", config=GenerationConfig(do_sample=True, temperature=2.0, seed=7))
    b = gen.generate(QUESTIONS, policy="slow", do_sample=True, temperature=2.0, seed=7)
    c = gen.generate(QUESTIONS, policy="slow", do_sample=True, temperature=2.0, seed=8)
    assert [r.token_ids for r in a] == [r.token_ids for r in b] != [r.token_ids for r in c]
    narrow = gen.generate(QUESTIONS, policy="slow", do_sample=True, temperature=2.0, top_p=1e-6, seed=7)
    assert [r.token_ids for r in narrow] == [r.token_ids for r in greedy_ids]  # top_p keeps at least the top token
    text = greedy_ids[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = gen.generate(QUESTIONS[0], policy="slow", stop_strings=[stop])
    assert stop in cut.text and text.startswith(cut.text) and len(cut.token_ids) < len(greedy_ids[0].token_ids)
    # a seed per prompt: each prompt samples alone what it samples in the batch; the same prompt, other seeds, differs
    seeds = [11, 12, 13]
    batch = gen.generate(QUESTIONS, policy="slow", do_sample=True, temperature=2.0, seed=seeds)
    alone = [gen.generate([q], policy="slow", do_sample=True, temperature=2.0, seed=[s])[0] for q, s in zip(QUESTIONS, seeds)]
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    same = gen.generate([QUESTIONS[1]] * 3, policy="slow", do_sample=True, temperature=2.0, seed=seeds)
    assert same[1].token_ids == batch[1].token_ids and len({tuple(r.token_ids) for r in same}) > 1
    with pytest.raises(ValueError, match="seed is a list of 2 values for 3 prompts"):
        gen.generate(QUESTIONS, policy="slow", do_sample=True, seed=[1, 2])
    for bad, name in [({"temperature": 0}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"stop_strings": "x"}, "stop_strings"),
                      ({"seed": [1, "2"]}, "seed"), ({"seed": 1.5}, "seed"),
                      ({"do_sample": 1}, "do_sample"), ({"beams": 2}, "unknown generation parameters")]:
        with pytest.raises(ValueError, match=name):
            gen.generate(QUESTIONS[0], policy="fast", **bad)


class Escalate(Hook):
    """A cascade in two lines: every fast answer, once finished, is answered again in slow mode."""

    def on_finish(self, engine, state):
        for r in state.rows:
            if r.mode == "fast":
                r.reopen("slow")


def test_a_reopened_answer_continues_from_the_cropped_prompt_like_a_fresh_slow_run(gen):
    """After a fast answer, the cache is cropped to the prompt prefix fast and slow share (the fast answer's positions
    dropped, never re-encoded), the rest of the slow prompt is prefilled, and the slow answer equals a fresh slow run."""
    fast, slow = gen.generate(QUESTIONS, policy="fast"), gen.generate(QUESTIONS, policy="slow")
    events = list(gen.engine(gen.hooks("fast", len(QUESTIONS)) + [Escalate()]).run(QUESTIONS))
    results = {e.row: e.result for e in events if isinstance(e, DoneEvent)}
    assert sum(isinstance(e, DoneEvent) for e in events) == len(QUESTIONS)  # one result per prompt, the final one
    for i, q in enumerate(QUESTIONS):
        r = results[i]
        assert (r.mode, r.final_mode) == ("fast", "slow") and r.token_ids == slow[i].token_ids and r.text == slow[i].text
        assert r.tokens == {"fast": fast[i].decoded_tokens, "slow": slow[i].decoded_tokens}  # both attempts count
        fast_ids, slow_ids = gen.prompt_ids(q, "fast"), gen.prompt_ids(q, "slow")
        shared = next(k for k, (a, b) in enumerate(zip(fast_ids, slow_ids)) if a != b)
        assert r.prompt_tokens == len(fast_ids) + len(slow_ids) - shared
        assert r.confidence == pytest.approx(slow[i].confidence, abs=1e-5)  # read from the slow answer's own KV


def test_verify_escalates_below_the_threshold_and_equals_a_fresh_slow_run(gen):
    """``verify``: every fast answer is checked; one below the threshold is answered again from the cropped cache,
    equal to a fresh slow run; both attempts' decoded tokens are counted, and only the slow prompt's differing suffix
    is prefilled again."""
    fast = gen.generate(QUESTIONS, policy="fast")
    slow = gen.generate(QUESTIONS, policy="slow")
    cut = 1 - sorted(r.confidence for r in fast)[1] - 1e-6  # the least confident two escalate, the third stands
    g = KVProbeGenerator(gen.lm, gen.difficulty, list(gen.correctness.values()), steering=SteeringSpec(escalate_above=cut))
    events = list(g.stream(QUESTIONS, policy="verify"))
    results = {e.row: e.result for e in events if isinstance(e, DoneEvent)}
    escalations = {e.row: e for e in events if isinstance(e, EscalateEvent)}
    assert len(escalations) == 2 and len(results) == 3
    for i, q in enumerate(QUESTIONS):
        r, f, s = results[i], fast[i], slow[i]
        assert r.verify_score == pytest.approx(1 - f.confidence, abs=1e-5) and r.mode == "fast"
        if i not in escalations:
            assert not r.escalated and r.token_ids == f.token_ids and r.final_mode == "fast" and r.reprompt_tokens == 0
            continue
        e = escalations[i]
        assert e.dropped == f.text and e.score > cut and e.threshold == cut
        assert r.escalated and r.final_mode == "slow" and r.token_ids == s.token_ids and r.text == s.text
        assert r.tokens == {"fast": f.decoded_tokens, "slow": s.decoded_tokens}  # every decoded token, both attempts
        assert r.confidence == pytest.approx(s.confidence, abs=1e-4)  # the slow answer's own probe
        fast_ids, slow_ids = g.prompt_ids(q, "fast"), g.prompt_ids(q, "slow")
        shared = next(j for j, (a, b) in enumerate(zip(fast_ids, slow_ids)) if a != b)
        assert r.reprompt_tokens == len(slow_ids) - shared and r.prompt_tokens == len(fast_ids) + len(slow_ids) - shared
    never = KVProbeGenerator(gen.lm, gen.difficulty, list(gen.correctness.values()), steering=SteeringSpec(escalate_above=2.0))
    assert [r.token_ids for r in never.generate(QUESTIONS, policy="verify")] == [r.token_ids for r in fast]


def test_route_plus_verify_sends_hard_questions_straight_to_slow_and_verifies_the_rest(gen):
    scores = sorted(r.route_score for r in gen.generate(QUESTIONS, policy="route"))
    steering = SteeringSpec(threshold=10.0, verify_route_threshold=(scores[1] + scores[2]) / 2, escalate_above=-1.0)
    g = KVProbeGenerator(gen.lm, gen.difficulty, list(gen.correctness.values()), steering=steering)
    results = g.generate(QUESTIONS, policy="route+verify")
    slow, fast = gen.generate(QUESTIONS, policy="slow"), gen.generate(QUESTIONS, policy="fast")
    assert sorted(r.mode for r in results) == ["fast", "fast", "slow"]  # the top score went straight to slow
    for r, s, f in zip(results, slow, fast):
        assert r.final_mode == "slow" and r.token_ids == s.token_ids  # every fast answer escalated (threshold -1)
        assert r.escalated == (r.mode == "fast")
        assert r.tokens == {"fast": f.decoded_tokens if r.escalated else 0, "slow": s.decoded_tokens}


def test_escalating_on_gain_weighs_the_wrong_answer_by_what_slow_mode_can_fix(gen, trained):
    """``escalate_on: gain``: the escalation score is (1 - P(fast answer right)) x P(slow right | fast wrong), the
    latter from the four-class difficulty probe on the fast prompt's cached window, equal to the probe on the
    captured window; the same rule offline (``kvprobe.cascade.escalation``)."""
    from kvprobe.cascade import escalation

    fast = next(p for p in (trained["root"] / "captures").iterdir() if p.name.startswith("arithmetic-fast"))
    shards, table = CaptureStore(fast).open()
    rows = table.to_pylist()[:3]
    helps = gen.difficulty.slow_helps({"prompt_kv": torch.cat([s["prompt_kv"] for s in shards])[:3].float()})
    assert ((helps >= 0) & (helps <= 1)).all()
    items = [r["question"] for r in rows]
    conf = torch.tensor([r.confidence for r in gen.generate(items, policy="fast")])
    want = escalation("gain", conf, helps)
    cut = float(want.median())
    g = KVProbeGenerator(gen.lm, gen.difficulty, list(gen.correctness.values()),
                         steering=SteeringSpec(escalate_on="gain", escalate_above=cut))
    results = g.generate(items, policy="verify")
    torch.testing.assert_close(torch.tensor([r.verify_score for r in results]), want, atol=1e-4, rtol=1e-4)
    assert [r.escalated for r in results] == (want > cut).tolist() and sum(r.escalated for r in results) == 1
    with pytest.raises(ValueError, match="escalate_on 'sometimes' is not one of"):
        SteeringSpec(escalate_on="sometimes")


def test_evaluate_counts_every_decoded_token_of_both_attempts(gen):
    """``kvprobe.evaluate.run_policy`` on ``verify`` with every fast answer escalated: its mean tokens are the fast
    and the slow attempts' decoded tokens, its slow share and escalation count say so, and re-prompted tokens are
    listed apart."""
    from kvprobe.evaluate import run_policy
    from kvprobe.tasks import Item

    items = [Item(f"q{i}", q, "7") for i, q in enumerate(QUESTIONS)]
    g = KVProbeGenerator(gen.lm, gen.difficulty, list(gen.correctness.values()), steering=SteeringSpec(escalate_above=-1.0))
    r = run_policy(g, items, "verify", batch_size=2)
    fast, slow = gen.generate(QUESTIONS, policy="fast"), gen.generate(QUESTIONS, policy="slow")
    want = [f.decoded_tokens + s.decoded_tokens for f, s in zip(fast, slow)]
    assert [row["decoded"] for row in r["rows"]] == want and r["mean_tokens"] == pytest.approx(sum(want) / 3)
    assert r["escalations"] == 3 and r["slow_share"] == 1.0 and all(row["final_mode"] == "slow" for row in r["rows"])
    assert r["mean_reprompt_tokens"] > 0 and r["mean_prompt_tokens"] > r["mean_reprompt_tokens"]
    assert [row["text"] for row in r["rows"]] == [s.text for s in slow]


def test_evaluate_runs_every_policy_it_offers(gen):
    """``kvprobe evaluate``'s default policies each answer greedily (``sample`` needs sampling: reports.sampling)."""
    from kvprobe.evaluate import parser, run_policy
    from kvprobe.tasks import Item

    policies = parser().parse_args([]).policies
    assert "sample" not in policies and "verify" in policies
    for policy in policies:
        r = run_policy(gen, [Item("q0", QUESTIONS[0], "7")], policy, 1, ["slow"] if policy == "oracle" else None)
        assert r["items"] == 1 and r["mean_tokens"] > 0


SAMPLING = dict(do_sample=True, temperature=2.0, seed=11)


def test_sample_policy_expands_one_prefill_into_seeded_samples(gen):
    """``sample``: one prefill per prompt, its cache expanded to a row per sample; sample j equals a single-prompt slow
    call seeded with the seed + j, in one wave or in waves (each later wave re-feeds only the prompt's last
    position); the tokens reported are the tokens decoded, the prompt counted once."""
    widths = Widths()
    hooks = gen.hooks("sample", 2, steering=SteeringSpec(samples=4, select="vote"))
    events = list(gen.engine(hooks + [widths], **SAMPLING).run(QUESTIONS[:2]))
    results = {e.row: e.result for e in events if isinstance(e, DoneEvent)}
    assert sorted(results) == [0, 1] and sum(isinstance(e, DoneEvent) for e in events) == 2
    prompt_width = max(len(gen.prompt_ids(q, "slow")) for q in QUESTIONS[:2])
    assert widths.seen[0] == prompt_width and max(widths.seen[1:]) == 1  # one prefill; every later step one column
    waves = gen.generate(QUESTIONS[:2], policy="sample", samples=4, select="vote", stop_on="agree", wave=2, **SAMPLING)
    for i, q in enumerate(QUESTIONS[:2]):
        alone = [gen.generate(q, policy="slow", do_sample=True, temperature=2.0, seed=11 + j) for j in range(4)]
        r = results[i]
        assert [s.text for s in r.samples] == [a.text for a in alone]
        assert r.decoded_tokens == sum(s.tokens for s in r.samples) == sum(a.decoded_tokens for a in alone)
        assert r.prompt_tokens == alone[0].prompt_tokens and r.reprompt_tokens == 0
        assert [s.confidence for s in r.samples] == pytest.approx([a.confidence for a in alone], abs=1e-4)
        w = waves[i]
        assert [s.text for s in w.samples] == [a.text for a in alone[: len(w.samples)]]
        assert len(w.samples) in (2, 4) and w.reprompt_tokens == len(w.samples) - 2  # the second wave's 2 rows
        assert w.decoded_tokens == sum(s.tokens for s in w.samples) and w.prompt_tokens == alone[0].prompt_tokens + w.reprompt_tokens
        chosen = [k for k, s in enumerate(w.samples) if s.answer == w.chosen] or [0]
        assert w.text in {w.samples[k].text for k in chosen}


def test_sample_policy_scores_equal_the_probe_on_a_sampled_capture(gen, trained, tmp_path):
    """A capture of ``samples`` seeded answers per question holds what the live ``sample`` policy draws (the same
    sampler, sample j seeded seed + j), and the live confidence of each sample equals the slow correctness probe on
    its captured answer KV."""
    from kvprobe.capture import CaptureSpec, GenerationSpec, capture
    from kvprobe.features import FeatureSpec
    from kvprobe.tasks import TaskSpec

    card = gen.correctness["slow"].card
    spec = CaptureSpec(ModelSpec(name=str(trained["model"])), TaskSpec("arithmetic", params={"n": 3, "seed": 5}),
                       card.prompt, GenerationSpec(max_new_tokens=dict(card.generation.max_new_tokens), batch_size=8,
                                                   do_sample=True, temperature=2.0, seed=11, samples=4),
                       FeatureSpec(hidden_states=False, token_trajectory=False, prompt_window=0))
    shards, table = CaptureStore(capture(spec, tmp_path, verbose=False).path).open()
    rows = table.to_pylist()
    assert [r["sample"] for r in rows] == [0, 1, 2, 3] * 3 and len({r["qid"] for r in rows}) == 3
    questions = [r["question"] for r in rows[::4]]
    live = gen.generate(questions, policy="sample", samples=4, select="probe_vote", **SAMPLING)
    want = gen.correctness["slow"].predict({"response_kv": torch.cat([s["response_kv"] for s in shards]).float()})
    texts = [s.text for r in live for s in r.samples]
    same = [i for i, r in enumerate(rows) if texts[i] == r["response"]]
    assert len(same) >= 10  # batch padding may flip a rare near-tie token
    got = torch.tensor([s.confidence for r in live for s in r.samples])
    torch.testing.assert_close(got[same], want[same], atol=1e-4, rtol=1e-4)


def test_early_stopping_draws_at_most_n_and_counts_every_token(gen):
    for stop_at, expect in [(-1e9, 2), (1e9, 6)]:  # settled at once: one wave; never settled: every sample
        results = gen.generate(QUESTIONS, policy="sample", samples=6, wave=2, stop_at=stop_at, **SAMPLING)
        for r in results:
            assert len(r.samples) == expect and r.decoded_tokens == sum(s.tokens for s in r.samples)
    label_free = gen.generate(QUESTIONS[0], policy="sample", samples=4, wave=2, stop_on="votes", stop_at=1e9, select="vote", **SAMPLING)
    assert len(label_free.samples) == 4
    odd = gen.generate(QUESTIONS[0], policy="sample", samples=5, wave=2, stop_at=1e9, **SAMPLING)
    assert len(odd.samples) == 5 and odd.reprompt_tokens == 3  # waves of 2, 2, then 1 (never more than n)
    with pytest.raises(ValueError, match="do_sample"):
        gen.generate(QUESTIONS[0], policy="sample")
    for bad, name in [({"select": "oracle"}, "select"), ({"samples": 0}, "samples"), ({"stop_on": "never"}, "stop_on")]:
        with pytest.raises(ValueError, match=name):
            gen.generate(QUESTIONS[0], policy="sample", **bad, **SAMPLING)


def test_a_probe_fits_on_sampled_answers_split_by_question(trained, tmp_path):
    """A sampled capture's rows keep their question and sample index; every split holds whole questions; a probe
    fitted on them exports a card that loads (its generation spec records the samples)."""
    from datamodules.kv_capture import SplitSpec, split_keys
    from kvprobe.export import load_probe

    args = common_args(trained["model"], tmp_path) + ["--data.capture.generation.do_sample", "true",
                                                       "--data.capture.generation.samples", "3", "--data.capture.prompt.mode", "slow"]
    main(["--config", "configs/coe.yaml", *args, "--export_dir", str(tmp_path / "probe")])
    probe = load_probe(tmp_path / "probe")
    assert probe.card.generation.samples == 3 and probe.card.generation.do_sample
    capture = next(p for p in (tmp_path / "captures").iterdir() if p.name.startswith("arithmetic-slow"))
    rows = CaptureStore(capture).open()[1].to_pylist()
    assert len(rows) == 3 * 40 and [r["sample"] for r in rows[:6]] == [0, 1, 2, 0, 1, 2]
    parts = SplitSpec().assign(split_keys(rows))
    for name, where in parts.items():
        others = {rows[i]["qid"] for n, w in parts.items() if n != name for i in w}
        assert not {rows[i]["qid"] for i in where} & others


def test_per_call_steering_overrides_apply_like_the_constructor(gen):
    """A steering setting given to one call steers that call exactly as the same setting given to the constructor
    (the route threshold was once read from the generator's own spec, so a per-call threshold was ignored)."""
    q = QUESTIONS[0]
    for threshold, mode in ((-1e9, "slow"), (1e9, "fast")):
        built = KVProbeGenerator(gen.lm, gen.difficulty, gen.correctness, gen.switch, SteeringSpec(threshold=threshold))
        assert built.generate(q, policy="route", max_new_tokens=3).mode == mode
        assert gen.generate(q, policy="route", threshold=threshold, max_new_tokens=3).mode == mode
        assert gen.generate(q, policy="route+switch", threshold=threshold, max_new_tokens=3).mode == mode
        # route+verify sends a question straight to slow on verify_route_threshold, else on threshold
        r = gen.generate(q, policy="route+verify", threshold=threshold, escalate_above=1e9, max_new_tokens=3)
        assert r.mode == mode and not r.escalated
    r = gen.generate(q, policy="route+verify", threshold=-1e9, verify_route_threshold=1e9, escalate_above=1e9, max_new_tokens=3)
    assert r.mode == "fast"


@pytest.mark.parametrize("override", [
    {"switch_low": "abc"}, {"switch_high": [1]}, {"probe_every": 0}, {"min_tokens": -1}, {"answer_cue": None},
    {"answer_cue": ""}, {"escalate_above": "x"}, {"verify_route_threshold": "bogus"}, {"threshold": [1, 2]},
    {"threshold": "high"}, {"threshold": True}, {"threshold": float("nan")}, {"stop_at": "soon"}, {"eta": "all"},
])
def test_bad_per_call_steering_is_refused_up_front(gen, override):
    """Every per-call steering value goes through the constructor's checks before any model work: one named
    ValueError, never a TypeError / ZeroDivisionError / KeyError mid-decode."""
    (name, value), = override.items()
    policy = "route+switch" if name in ("switch_low", "switch_high", "probe_every", "min_tokens", "answer_cue") else "route+verify"
    with pytest.raises(ValueError, match=name):
        gen.generate(QUESTIONS[0], policy=policy, max_new_tokens=3, **override)
    with pytest.raises(ValueError, match=name):
        KVProbeGenerator(gen.lm, gen.difficulty, gen.correctness, gen.switch, SteeringSpec(**override))
    assert gen.generate(QUESTIONS[0], policy=policy, max_new_tokens=3).text is not None  # the generator still answers


def test_steering_must_be_a_spec(gen, trained, tmp_path):
    gen.save_pretrained(tmp_path / "g")
    with pytest.raises(ValueError, match="SteeringSpec"):
        KVProbeGenerator.from_pretrained(tmp_path / "g", model=gen.lm, steering="fast")


def test_an_empty_prompt_is_refused(gen):
    for empty in ("", "   \n"):
        with pytest.raises(ValueError, match="prompt is empty"):
            gen.generate(empty, policy="fast", max_new_tokens=2)


def test_a_prompt_with_a_lone_surrogate_is_named(gen):
    with pytest.raises(ValueError, match="lone surrogate at character 5"):
        gen.generate("What \ud800 is 2?", policy="fast", max_new_tokens=2)


@pytest.mark.parametrize("policy", ["fast", "slow", "route", "route+switch", "verify", "route+verify"])
def test_an_open_batch_admits_prompts_mid_decode_and_answers_each_as_alone(gen, policy):
    """Continuous batching (``stream(admit=...)``): prompts that join a running batch at later steps, their caches
    merged in, get the answers, modes, token counts and confidences they get alone; each finishes on its own."""
    arrivals = {2: [QUESTIONS[1]], 5: [QUESTIONS[2], QUESTIONS[0]]}
    calls = []

    def admit():
        calls.append(1)
        return arrivals.get(len(calls), [])

    order = [QUESTIONS[0], QUESTIONS[1], QUESTIONS[2], QUESTIONS[0]]
    done, finished_at = {}, {}
    for event in gen.stream([order[0]], policy, max_new_tokens={"fast": 8, "slow": 24}, admit=admit):
        if isinstance(event, DoneEvent):
            done[event.row] = event.result
            finished_at[event.row] = len(calls)
    assert sorted(done) == [0, 1, 2, 3]
    for row, q in enumerate(order):
        alone = gen.generate(q, policy, max_new_tokens={"fast": 8, "slow": 24})
        got = done[row]
        assert (got.text, got.mode, got.final_mode, got.tokens, got.escalated, got.switched_at) == (
            alone.text, alone.mode, alone.final_mode, alone.tokens, alone.escalated, alone.switched_at), (row, policy)
        assert got.confidence == pytest.approx(alone.confidence, abs=1e-5)
    assert min(finished_at.values()) < max(finished_at.values())  # rows end on their own, not with the batch


def test_an_open_batch_answers_a_finished_row_before_the_next_forward(gen):
    """In an open batch a row that ends is answered at once: its ``DoneEvent`` comes before the model runs again for
    the rows still decoding (a short request behind a long one does not wait one more step)."""
    ended = {}  # row -> forwards run when its last token was picked

    class Forwards(Hook):
        count = 0

        def on_forward(self, engine, state, blocks, fed):
            Forwards.count += 1

        def on_token(self, engine, state, blocks):
            for r in state.rows:
                if r.done:
                    ended.setdefault(r.index, Forwards.count)

    calls = []

    def admit():
        calls.append(1)
        return [QUESTIONS[1]] if len(calls) == 3 else []

    done_at = {}
    for event in gen.stream([QUESTIONS[0]], "slow", max_new_tokens=12, hooks=[Forwards()], admit=admit):
        if isinstance(event, DoneEvent):
            done_at[event.row] = Forwards.count
    assert sorted(done_at) == [0, 1]
    assert done_at[0] < done_at[1]  # row 0 ended while row 1 still decoded
    assert done_at == ended  # no forward between a row's last token and its answer


def test_sampling_settings_per_prompt(gen):
    """``do_sample``, ``temperature`` and ``top_p`` per prompt (as a server batches requests): each prompt decodes as
    it does alone with its own settings; a list of the wrong length, or a bad value in one, is refused."""
    qs = [QUESTIONS[0], QUESTIONS[1], QUESTIONS[1]]
    mixed = gen.generate(qs, "slow", max_new_tokens=10, do_sample=[False, True, True], temperature=[1.0, 0.8, 1.5],
                         top_p=[1.0, 0.9, 1.0], seed=[0, 5, 6])
    assert mixed[0].text == gen.generate(qs[0], "slow", max_new_tokens=10).text
    for i, (t, p, s) in ((1, (0.8, 0.9, 5)), (2, (1.5, 1.0, 6))):
        alone = gen.generate([qs[i]], "slow", max_new_tokens=10, do_sample=[True], temperature=[t], top_p=[p], seed=[s])
        assert mixed[i].text == alone[0].text
    with pytest.raises(ValueError, match="temperature is a list of 2 values for 3 prompts"):
        gen.generate(qs, "slow", do_sample=True, temperature=[0.5, 0.7], seed=[1, 2, 3])
    with pytest.raises(ValueError, match="top_p must be"):
        gen.generate(qs, "slow", do_sample=True, top_p=[0.5, 0.0, 1.0])
