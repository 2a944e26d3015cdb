"""Bad input at every door: a result or one of kvprobe's named errors, never a raw KeyError/TypeError/JSONDecodeError;
damaged files name themselves and lose nothing already computed; the cache is shared the way the umask says."""

import json
import re
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvprobe.capture import CaptureSpec, GenerationSpec, capture
from kvprobe.features import FeatureSpec
from kvprobe.models import ModelSpec, resolve
from kvprobe.prompts import PromptSpec
from kvprobe.store import CaptureStore, CorruptCapture
from kvprobe.tasks import TaskError, TaskSpec, load_items

TASK = TaskSpec("arithmetic", params={"n": 10, "seed": 1})
GEN = GenerationSpec(max_new_tokens={"fast": 6, "slow": 10}, batch_size=3, shard_size=4)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def run(tiny, root, **kw):
    """capture() of TASK on the tiny model; ``kw`` replaces spec fields (model, task, ...) or capture's own arguments."""
    spec = dict(model=ModelSpec(name=str(tiny)), task=TASK, prompt=PromptSpec(), generation=GEN, features=FeatureSpec(prompt_window=4))
    spec |= {k: v for k, v in kw.items() if k in spec}
    return capture(CaptureSpec(**spec), **({"root": root, "verbose": False} | {k: v for k, v in kw.items() if k not in spec}))


def forbid_model_work(monkeypatch):
    import kvprobe.capture as C

    monkeypatch.setattr(C, "load_model", lambda spec: pytest.fail("model work was done"))


# --- inputs checked at the door ---------------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
rows = st.dictionaries(st.sampled_from(["question", "answer", "choices", "id", "other"]), json_values, max_size=5)
lines = st.one_of(rows.map(json.dumps), json_values.map(json.dumps), st.binary(max_size=12).map(lambda b: b.decode("latin-1")))


@FAST
@given(content=st.lists(lines, max_size=5), choices=st.booleans(), raw=st.binary(max_size=6))
def test_jsonl_task_gives_items_or_a_task_error(tmp_path, content, choices, raw):
    path = tmp_path / "q.jsonl"
    path.write_bytes("\n".join(content).encode("utf-8") + raw)
    params = {"path": str(path), "id_field": "id"} | ({"choices_field": "choices"} if choices else {})
    try:
        items = load_items(TaskSpec("jsonl", params=params))
    except TaskError as err:
        assert str(path) in str(err) or "selects no items" in str(err) or "appears twice" in str(err)
        return
    assert all(item.question.strip() and item.gold for item in items)


@FAST
@given(limit=st.one_of(st.none(), st.integers(-3, 3), st.booleans(), st.text(max_size=2), st.floats(-2, 2)),
       offset=st.one_of(st.integers(-3, 3), st.none(), st.text(max_size=2)),
       params=st.dictionaries(st.sampled_from(["n", "seed", "terms", "digits", "digit", "operators", "min_digits"]),
                              st.one_of(st.integers(-2, 4), st.text(max_size=3), st.none()), max_size=3))
def test_task_spec_and_arithmetic_params_give_items_or_a_task_error(limit, offset, params):
    try:
        items = load_items(TaskSpec("arithmetic", limit=limit, offset=offset, params=params))
    except TaskError:
        return
    assert items and (limit is None or len(items) <= limit)


@FAST
@given(caps=st.one_of(st.none(), st.integers(-1, 3), st.text(max_size=3),
                      st.dictionaries(st.sampled_from(["fast", "slow", "medium"]), st.one_of(st.integers(-2, 9), st.floats(0, 9), st.text(max_size=2)), max_size=3)),
       batch=st.one_of(st.integers(-1, 4), st.floats(0, 3), st.text(max_size=2)), shard=st.integers(-1, 4),
       dtype=st.sampled_from(["float32", "bfloat16", "fp8", "", "float16"]), mode=st.sampled_from(["fast", "slow", "medium"]))
def test_specs_validate_in_post_init(caps, batch, shard, dtype, mode):
    for make in (lambda: GenerationSpec(max_new_tokens=caps, batch_size=batch, shard_size=shard),
                 lambda: ModelSpec(dtype=dtype), lambda: PromptSpec(mode=mode)):
        try:
            make()
        except ValueError as err:
            assert any(word in str(err) for word in ("max_new_tokens", "batch_size", "shard_size", "dtype", "mode"))


def test_named_errors_for_the_issue_cases(tmp_path):
    with pytest.raises(TaskError, match="task.limit must be a positive number"):
        TaskSpec("arithmetic", limit=-1)
    with pytest.raises(TaskError, match="task.offset must be 0 or more"):
        TaskSpec("arithmetic", offset=-2)
    with pytest.raises(TaskError, match=r"task 'arithmetic' has no option 'digit'; its options: n, seed, terms, digits"):
        load_items(TaskSpec("arithmetic", params={"digit": 3}))
    with pytest.raises(TaskError, match="task 'gsm8k' has no option 'n'; its options: none"):
        load_items(TaskSpec("gsm8k", params={"n": 3}))
    for caps in ({"fast": 0, "slow": 5}, {"medium": 5}, {"fast": "8"}, {"slow": 2.5}, 7):
        with pytest.raises(ValueError, match="generation.max_new_tokens maps modes"):
            GenerationSpec(max_new_tokens=caps)
    for name in ("batch_size", "shard_size"):
        with pytest.raises(ValueError, match=f"generation.{name} must be a whole number >= 1"):
            GenerationSpec(**{name: 0})
    path = tmp_path / "q.jsonl"
    for row, what in (({"question": None, "answer": "2"}, "'question' is null"), ({"question": "1+1?", "answer": ""}, "'answer' is empty"),
                      ({"question": "1+1?", "answer": None}, "'answer' is null"), ({"question": "1+1?", "answer": "2", "c": 3}, None)):
        path.write_text(json.dumps({"question": "ok?", "answer": "1", "c": ["x", "y"]}) + "\n\n" + json.dumps(row) + "\n")
        if what is None:
            with pytest.raises(TaskError, match=r"q.jsonl:3: 'c' must be a list of at least two choices"):
                load_items(TaskSpec("jsonl", params={"path": str(path), "choices_field": "c"}))
            continue
        with pytest.raises(TaskError, match=rf"q.jsonl:3: field {what}"):
            load_items(TaskSpec("jsonl", params={"path": str(path)}))
    path.write_bytes(b'{"question": "ok?", "answer": "1"}\n{"question": "caf\xe9?", "answer": "1"}\n')
    with pytest.raises(TaskError, match=r"q.jsonl:2: not UTF-8"):
        load_items(TaskSpec("jsonl", params={"path": str(path)}))


def test_a_mistyped_model_name_is_named_at_once_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"'smolm2' is neither an embedded alias.*HF_HUB_OFFLINE is set\. Did you mean 'smollm2'\?"):
        resolve("smolm2")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    import kvprobe.models

    def refused(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(kvprobe.models.socket, "create_connection", refused)
    with pytest.raises(FileNotFoundError, match="huggingface.co cannot be reached"):
        resolve("someone/some-model")
    assert time.perf_counter() - start < 5


def test_the_command_line_gives_one_line_and_the_traceback_on_debug(tmp_path):
    cmd = [sys.executable, "-m", "kvprobe.cli", "capture", "--capture.task.name", "arithmetic", "--capture.task.limit", "-1"]
    env = {k: v for k, v in os.environ.items() if k != "KVPROBE_DEBUG"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("kvprobe capture: error:")]
    assert done.returncode == 2 and len(errors) == 1 and "task.limit must be a positive number" in errors[0]
    assert "Traceback" not in done.stderr
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "TaskError" in debug.stderr


# --- damaged files name themselves; nothing computed is lost -----------------------------------------------------

def test_damaged_capture_files_are_rebuilt_without_model_work(tiny, tmp_path, monkeypatch):
    first = run(tiny, tmp_path)
    manifest = first.path / "manifest.json"
    forbid_model_work(monkeypatch)
    manifest.write_text(manifest.read_text()[:40])  # truncated
    with pytest.warns(UserWarning, match="manifest.json is damaged; removed"):
        again = run(tiny, tmp_path)
    assert again.path == first.path and again.summary["items"] == 10 and CaptureStore(first.path).verify() == []
    assert again.summary["capture_seconds"] == first.summary["capture_seconds"]  # the total survives a rebuild
    assert CaptureStore(first.path).seconds(3) > 0
    (first.path / "spec.json").write_text("{not json")
    run(tiny, tmp_path)
    assert json.loads((first.path / "spec.json").read_text())["fingerprint"]  # rewritten on reuse
    (first.path / "table.parquet").write_bytes(b"PAR1")
    assert run(tiny, tmp_path).summary["items"] == 10 and len(pq.read_table(first.path / "table.parquet")) == 10
    (first.path / "shard-00001.done.json").write_text("[1, 2]")  # valid JSON, not an object: the shard is redone
    monkeypatch.undo()
    with pytest.warns(UserWarning, match=r"shard 1 is corrupt \(unreadable shard-00001.done.json"):
        assert run(tiny, tmp_path).summary["items"] == 10
    (first.path / "manifest.json").unlink()
    (first.path / "spec.json").unlink()
    with pytest.raises(CorruptCapture, match="spec.json is missing or damaged: run the capture again"):
        CaptureStore(first.path).spec()


def test_a_setting_that_fails_late_leaves_no_folder(tiny, tmp_path, monkeypatch):
    import kvprobe.capture as C

    def broken(spec):
        raise OSError("weights unreadable")

    monkeypatch.setattr(C, "load_model", broken)
    with pytest.raises(OSError, match="weights unreadable"):
        run(tiny, tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_a_resumed_capture_reports_its_whole_time(tiny, tmp_path):
    from kvprobe.models import load_model
    from tests.test_capture import CountingModel

    lm = load_model(ModelSpec(name=str(tiny)))
    counter = CountingModel(lm, fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, tmp_path, loaded=lm)
    [path] = [p for p in tmp_path.iterdir() if p.is_dir()]
    first_part = json.loads((path / "shard-00000.done.json").read_text())["seconds"]
    counter.fail_on_call = None
    result = run(tiny, tmp_path, loaded=lm)
    parts = [json.loads((path / f"shard-{j:05d}.done.json").read_text())["seconds"] for j in range(3)]
    assert first_part > 0 and result.summary["capture_seconds"] == pytest.approx(sum(parts), abs=0.05)


def test_truncation_dominated_capture_warns_and_records_its_share(tiny_models, tmp_path, capsys):
    result = run(tiny_models["llama"], tmp_path, generation=GenerationSpec(max_new_tokens={"fast": 2, "slow": 2}, batch_size=5), verbose=True)
    share = result.summary["cap_share"]
    assert share == result.summary["unfinished"] / 10 and share > 0.1
    out = capsys.readouterr().out
    assert f"WARNING: {share:.0%} of the answers" in out and "generation.max_new_tokens.slow=2" in out and '"slow": 4' in out


def test_cache_files_follow_the_umask(tiny, tmp_path):
    old = os.umask(0o022)
    try:
        result = run(tiny, tmp_path)
    finally:
        os.umask(old)
    for f in result.path.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name
    assert stat.S_IMODE(result.path.stat().st_mode) == 0o755


def test_damaged_generator_and_probe_files_name_themselves(tmp_path):
    from kvprobe.export import read_card
    from kvprobe.steering import KVProbeGenerator

    folder = tmp_path / "gen"
    folder.mkdir()
    for text, match in (("{oops", "not valid JSON"), ('{"probes": {"router": "x"}}', "must name its probes"),
                        ("[1]", "must name its probes"), ('{"probes": {"difficulty": "d"}, "steering": 3}', "'steering' must be an object")):
        (folder / "generator.json").write_text(text)
        with pytest.raises(ValueError, match=f"generator.json.*{match}.*kvprobe assemble|generator.json: 'steering'"):
            KVProbeGenerator.from_pretrained(folder)
    probe = tmp_path / "probe"
    probe.mkdir()
    complete = {k: {} for k in ("probe_args", "features", "prompt", "generation", "task")} | {
        "probe_class": "kvprobe.probes.correctness.CorrectnessProbe", "base_model": {"name": "m", "fingerprint": "f"}}
    for text, match in (('{"probe_class": "x"}', "lacks probe_args, base_model"), ("[]", "lacks probe_class"),
                        (json.dumps(complete | {"base_model": {}}), "lacks base_model.name/fingerprint"),
                        (json.dumps(complete | {"prompt": {"mode": "medium"}}), "probe.json: prompt mode 'medium' is not one of"),
                        (json.dumps(complete | {"features": {"colour": 1}}), "probe.json: .*unexpected keyword argument 'colour'")):
        (probe / "probe.json").write_text(text)
        with pytest.raises(ValueError, match=match):
            read_card(probe)


def test_one_question_under_two_ids_never_straddles_splits():
    from datamodules.kv_capture import SplitSpec, split_keys

    rows = [{"qid": f"q{i}", "question": f"What is {i % 15} + 1?"} for i in range(30)]  # q0 and q15 ask the same
    rows[15]["question"] = "  what IS 0 + 1? "
    keys = split_keys(rows)
    assert keys[15] == keys[0] == "q0" and all(keys[i] == keys[i + 15] in (f"q{i}", f"q{i + 15}") for i in range(15))
    parts = SplitSpec(0.6, 0.2, 0.2, seed=3).assign(keys)
    for name, idx in parts.items():
        texts = {" ".join(rows[i]["question"].lower().split()) for i in idx}
        others = {" ".join(rows[i]["question"].lower().split()) for other, oidx in parts.items() if other != name for i in oidx}
        assert not texts & others
    unique = [{"qid": f"q{i}", "question": f"Q{i}"} for i in range(20)]  # without repeats the split is by id, as before
    assert SplitSpec(seed=3).assign(split_keys(unique)) == SplitSpec(seed=3).assign([r["qid"] for r in unique])


# --- what already held, kept by tests -----------------------------------------------------------------------------

CAPTURE_SCRIPT = """
import sys
import torch
torch.set_num_threads(1)  # two of these share two cores
from kvprobe.capture import CaptureSpec, GenerationSpec, capture
from kvprobe.features import FeatureSpec
from kvprobe.models import ModelSpec
from kvprobe.tasks import TaskSpec
capture(CaptureSpec(model=ModelSpec(name=sys.argv[1]), task=TaskSpec("arithmetic", params={"n": 24, "seed": 4}),
                    generation=GenerationSpec(max_new_tokens={"fast": 6, "slow": 12}, batch_size=2, shard_size=4),
                    features=FeatureSpec(prompt_window=4)), root=sys.argv[2], verbose=False)
"""


def _capture_process(model, root):
    return subprocess.Popen([sys.executable, "-c", CAPTURE_SCRIPT, str(model), str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _shard_bytes(path):
    return {f.name: f.read_bytes() for f in sorted(path.glob("shard-*.safetensors"))}


def test_kill_9_mid_capture_resumes_to_the_same_bytes(tiny_models, tmp_path):
    import signal

    model = tiny_models["qwen3"]
    proc = _capture_process(model, tmp_path / "killed")
    deadline = time.time() + 240
    while not list((tmp_path / "killed").glob("*/shard-00001.done.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [folder] = list((tmp_path / "killed").iterdir())
    assert not (folder / "manifest.json").exists()
    assert _capture_process(model, tmp_path / "killed").wait() == 0
    assert _capture_process(model, tmp_path / "clean").wait() == 0
    [clean] = list((tmp_path / "clean").iterdir())
    assert _shard_bytes(folder) == _shard_bytes(clean) and len(_shard_bytes(folder)) == 6
    assert pq.read_table(folder / "table.parquet").drop(["model"]).equals(pq.read_table(clean / "table.parquet").drop(["model"]))


def test_two_simultaneous_captures_of_one_spec_agree(tiny_models, tmp_path):
    model = tiny_models["llama"]
    procs = [_capture_process(model, tmp_path / "shared") for _ in range(2)]
    assert [p.wait() for p in procs] == [0, 0], [p.stderr.read().decode()[-2000:] for p in procs]
    [folder] = list((tmp_path / "shared").iterdir())
    assert CaptureStore(folder).verify() == [] and CaptureStore(folder).manifest()["summary"]["items"] == 24
    assert _capture_process(model, tmp_path / "alone").wait() == 0
    [alone] = list((tmp_path / "alone").iterdir())
    assert _shard_bytes(folder) == _shard_bytes(alone)


def test_a_pickle_named_safetensors_is_refused_without_running_and_a_foreign_class_is_refused(tmp_path):
    import pickle

    from kvprobe.export import load_probe

    folder = tmp_path / "probe"
    folder.mkdir()
    config = {"probe_class": "kvprobe.probes.correctness.CorrectnessProbe", "probe_args": {}, "features": {}, "prompt": {},
              "generation": {}, "task": {}, "base_model": {"name": "m", "fingerprint": "f"}}
    (folder / "probe.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / "probe.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="probe.safetensors is not a readable safetensors file"):
        load_probe(folder)
    assert not marker.exists()
    (folder / "probe.json").write_text(json.dumps(config | {"probe_class": "os.system"}))
    with pytest.raises(ValueError, match="unknown probe class 'os.system'"):
        load_probe(folder)


def test_the_source_never_unpickles_nor_runs_remote_code():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for file in [*(root / "kvprobe").rglob("*.py"), *(root / "datamodules").rglob("*.py")]:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "dill", "cloudpickle", "joblib"} & {n.split(".")[0] for n in names}, file
            if isinstance(node, ast.Call):
                keywords = {k.arg: k.value for k in node.keywords}
                assert "trust_remote_code" not in keywords, f"{file}:{node.lineno}"
                func = ast.unparse(node.func)
                if func in ("torch.load", "load"):
                    safe = keywords.get("weights_only")
                    assert isinstance(safe, ast.Constant) and safe.value is True, f"{file}:{node.lineno}: torch.load without weights_only=True"


# --- destinations are checked before any model work ---------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--limit", "0"], "--limit must be"), (["--limit", "-1"], "--limit must be"), (["--batch_size", "0"], "--batch_size must be"),
])
def test_evaluate_refuses_bad_counts_before_loading_anything(argv, message, monkeypatch):
    from kvprobe import evaluate

    monkeypatch.setattr(evaluate.KVProbeGenerator, "from_pretrained", lambda *a, **k: pytest.fail("model work before the check"))
    with pytest.raises(ValueError, match=message):
        evaluate.main(argv)


def test_evaluate_and_capture_destinations_are_checked_first(tmp_path, monkeypatch, capsys):
    from kvprobe import evaluate
    from kvprobe.cli import main as cli_main
    from kvprobe.paths import write_json_or_keep

    monkeypatch.setattr(evaluate.KVProbeGenerator, "from_pretrained", lambda *a, **k: pytest.fail("model work before the check"))
    with pytest.raises(OSError, match="is a folder"):
        evaluate.main(["--out", str(tmp_path)])
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OSError, match="cannot be written"):
        evaluate.main(["--out", str(blocker / "sub" / "live.json")])
    assert cli_main(["capture", "--devices", "-1"]) == 2 and "--devices must be" in capsys.readouterr().err
    with pytest.raises(OSError, match="kept in (.+json)") as err:  # a write that fails after all keeps the results
        write_json_or_keep(blocker / "live.json", {"accuracy": 0.5})
    kept = re.search(r"kept in (\S+json)", str(err.value)).group(1)
    assert json.loads(Path(kept).read_text()) == {"accuracy": 0.5}


def test_fit_refuses_an_export_folder_it_cannot_write_before_capture(tiny, tmp_path):
    from kvprobe.fit import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = ["--config", "configs/coe.yaml", "--data.capture.model.name", str(tiny), "--data.capture.task.params", '{"n": 8}',
            "--data.cache_dir", str(tmp_path / "captures"), "--trainer.logger", "false", "--export_dir", str(blocker / "probe")]
    with pytest.raises(OSError, match="is a file, not a folder|cannot be written"):
        main(args)
    assert not (tmp_path / "captures").exists()  # nothing was captured


def test_a_grader_with_the_wrong_signature_is_named_before_model_work():
    from kvprobe.tasks import grader_of

    with pytest.raises(TaskError, match=r"must take \(item, response, mode\).*\(item, response\)"):
        grader_of(TaskSpec(grader="graders.two_arguments"))
    assert grader_of(TaskSpec(grader="graders.parity")) is not None


def test_ctrl_c_during_a_capture_prints_one_line_and_a_rerun_resumes(tiny_models, tmp_path):
    """SIGINT once the first shard is on disk: exit 130, one line saying what is kept, no traceback; the same
    command then finishes the capture from the kept shards."""
    import signal

    # long enough (400 answers of 48 tokens, ~20 s) that the signal lands mid-capture on a fast machine too
    cmd = [sys.executable, "-m", "kvprobe", "capture", "--capture.model.name", str(tiny_models["llama"]),
           "--capture.task.params", '{"n": 400, "digits": 2}', "--capture.generation.shard_size", "8",
           "--capture.generation.batch_size", "8", "--capture.generation.max_new_tokens", '{"fast": 4, "slow": 48}',
           "--cache_dir", str(tmp_path / "c")]
    env = {k: v for k, v in os.environ.items() if k != "KVPROBE_DEBUG"}
    # a child of a background job inherits SIGINT ignored (POSIX), and Python then keeps it ignored: restore it
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not list((tmp_path / "c").rglob("shard-00000.done.json")) and time.time() < deadline and run.poll() is None:
        time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "kvprobe capture: interrupted; everything finished is kept" in err
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    store = next((tmp_path / "c").iterdir())
    assert CaptureStore(store).complete


def test_small_misuses_get_named_errors(tmp_path, monkeypatch):
    """Issue 28's loose ends: a datamodule given a path string, a dataloader before setup, an unbounded arithmetic
    task, CUDA asked for without CUDA, and a save to the empty path (which once left a stray folder)."""
    import torch

    from datamodules import KVCaptureDataModule
    from kvprobe.export import replace_folder
    from kvprobe.models import load_model

    with pytest.raises(ValueError, match="capture must be a CaptureSpec"):
        KVCaptureDataModule("configs/captures/arithmetic.yaml")
    with pytest.raises(RuntimeError, match="not set up yet"):
        KVCaptureDataModule().train_dataloader()
    for n in (0, 10**9):
        with pytest.raises(TaskError, match="arithmetic n must be"):
            load_items(TaskSpec("arithmetic", params={"n": n}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="asks for CUDA"):
        load_model(ModelSpec(name="smollm2", device_map="cuda:0"))
    monkeypatch.chdir(tmp_path)
    for empty in ("", ".", "  "):
        with pytest.raises(ValueError, match="names no folder"):
            with replace_folder(empty, "probe.json", {"probe.json"}):
                pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("row, message", [
    ({"question": {"q": 1}, "answer": "3"}, "'question' must be text"),
    ({"question": "2+1?", "answer": [3]}, "'answer' must be text or a number"),
    ({"question": "2+1?", "answer": True}, "'answer' must be text or a number"),
    ({"question": "2+1?", "answer": "3", "idd": 7}, "no id field 'id'"),
])
def test_jsonl_fields_of_the_wrong_type_or_a_misspelt_id_field_are_named(tmp_path, row, message):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(TaskError, match=message):
        load_items(TaskSpec("jsonl", params={"path": str(path), "id_field": "id"} if "idd" in row else {"path": str(path)}))


def test_a_lone_surrogate_is_named_with_its_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "ok?", "answer": "1"}\n{"question": "bad \\ud800 text", "answer": "2"}\n')
    with pytest.raises(TaskError, match=r"q.jsonl:2: field 'question' holds a lone surrogate"):
        load_items(TaskSpec("jsonl", params={"path": str(path)}))


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (b"# only a comment\n", "is empty"),
                                              (b"\xff\xfe model: x", "not UTF-8")])
def test_an_empty_or_undecodable_config_names_its_file(tmp_path, capsys, content, message):
    from kvprobe.cli import main as cli_main

    config = tmp_path / "c.yaml"
    config.write_bytes(content)
    for command in ("fit", "capture", "study"):
        assert cli_main([command, "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert str(config) in err and message in err
