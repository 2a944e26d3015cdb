"""Capture end to end on tiny models: store layout, fingerprint reuse, resume, corruption, data-parallel, PEFT."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from datamodules import KVCaptureDataModule, SplitSpec
from kvprobe.capture import CaptureSpec, GenerationSpec, capture, main
from kvprobe.features import FeatureSpec
from kvprobe.models import ModelSpec, load_model
from kvprobe.prompts import PromptSpec
from kvprobe.store import CaptureStore
from kvprobe.tasks import TaskError, TaskSpec

TASK = TaskSpec("arithmetic", params={"n": 10, "seed": 1})
GEN = GenerationSpec(max_new_tokens={"fast": 6, "slow": 10}, batch_size=3, shard_size=4)


def run(tiny, root, **kw):
    """capture() of TASK on the tiny model; ``kw`` replaces spec fields (model, task, ...) or capture's own arguments."""
    spec = dict(model=ModelSpec(name=str(tiny)), task=TASK, prompt=PromptSpec(), generation=GEN, features=FeatureSpec(prompt_window=4))
    spec |= {k: v for k, v in kw.items() if k in spec}
    return capture(CaptureSpec(**spec), **({"root": root, "verbose": False} | {k: v for k, v in kw.items() if k not in spec}))


def shard_tensors(path):
    # copies: load_file memory-maps, and some tests truncate the files afterwards
    return [{k: v.clone() for k, v in load_file(f).items()} for f in sorted(path.glob("shard-*.safetensors"))]


class CountingModel:
    """Wraps a LoadedModel's generate to count (or forbid) model work."""

    def __init__(self, lm, fail_on_call=None):
        self.calls, self.fail_on_call, self.inner = 0, fail_on_call, lm.model.generate
        lm.model.generate = self

    def __call__(self, *a, **k):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt("simulated interruption")
        return self.inner(*a, **k)


def test_store_layout_and_table(tiny, tmp_path):
    result = run(tiny, tmp_path)
    files = {f.name for f in result.path.iterdir()}
    assert {"spec.json", "manifest.json", "table.parquet", "shard-00000.safetensors", "shard-00002.done.json"} <= files
    rows = pq.read_table(result.path / "table.parquet").to_pylist()
    assert [r["index"] for r in rows] == list(range(10))
    assert {"qid", "question", "gold", "response", "prediction", "correct", "gen_tokens", "mode", "max_prob", "entropy"} <= rows[0].keys()
    shards = shard_tensors(result.path)
    lm = load_model(ModelSpec(name=str(tiny)))
    s = lm.shape
    assert shards[0]["response_kv"].shape == (4, s.layers, 2, s.kv_heads, s.head_dim)
    assert shards[0]["prompt_kv"].shape == (4, s.layers, 2, s.kv_heads, 4, s.head_dim)
    offsets = shards[0]["token_offsets"]
    assert offsets[-1] == len(shards[0]["token_kv"]) and (offsets.diff() == torch.tensor([r["gen_tokens"] for r in rows[:4]])).all()
    assert result.summary["items"] == 10 and result.summary["bytes_on_disk"] > 0


def test_answer_and_grade_answers_like_capture(tiny, tmp_path):
    """The reports' quick answer-and-grade gives capture's answers and grades (the grader reads the text)."""
    from graders import by_text
    from kvprobe.tasks import load_items
    from reports.common import answer_and_grade

    one = GenerationSpec(max_new_tokens=GEN.max_new_tokens, batch_size=1, shard_size=4)  # batch 1: no padding either way
    task = TaskSpec(TASK.name, params=TASK.params, grader="graders.by_text")
    rows = pq.read_table(run(tiny, tmp_path, generation=one, task=task).path / "table.parquet").to_pylist()
    correct, tokens = answer_and_grade(load_model(ModelSpec(name=str(tiny))), load_items(TASK), PromptSpec(), one, by_text)
    assert correct == [r["correct"] for r in rows] and tokens == [r["gen_tokens"] for r in rows]
    assert len(set(correct)) == 2  # both grades occur


def test_capture_leaves_the_callers_random_state_alone(tiny, tmp_path):
    """A probe initialised after a capture must not depend on whether the capture ran or was cached."""
    torch.manual_seed(123)
    run(tiny, tmp_path)  # captures (seeds each shard)
    after_capture = torch.rand(3)
    torch.manual_seed(123)
    run(tiny, tmp_path)  # cached
    assert torch.equal(after_capture, torch.rand(3))


def test_rerun_with_same_fingerprint_does_no_model_work(tiny, tmp_path, monkeypatch):
    first = run(tiny, tmp_path)
    with monkeypatch.context() as m:  # not even a model load
        m.setattr("kvprobe.capture.load_model", lambda spec: pytest.fail("the model was loaded on a cached rerun"))
        assert run(tiny, tmp_path).summary["reused"]
    lm = load_model(ModelSpec(name=str(tiny)))
    counter = CountingModel(lm)
    second = run(tiny, tmp_path, loaded=lm)
    assert counter.calls == 0 and second.path == first.path and second.summary["reused"]
    third = run(tiny, tmp_path, loaded=lm, prompt=PromptSpec(mode="fast"))  # another prompt: another fingerprint
    assert counter.calls > 0 and third.path != first.path


def test_grading_change_regrades_stored_answers_without_generating(tiny, tmp_path, monkeypatch):
    """A newer GRADING_VERSION finds the capture its predecessor graded, regrades the stored answers into its own
    folder and loads no model; the tensors are the same and the older folder stays as it was."""
    import kvprobe.capture as C

    first = run(tiny, tmp_path)
    before = pq.read_table(first.path / "table.parquet").to_pylist()
    monkeypatch.setattr(C, "GRADING_VERSION", C.GRADING_VERSION + 1)
    # a new kvprobe version: its own grading changed (a grading version, not an argument, so it is patched here)
    monkeypatch.setattr("kvprobe.tasks.grade", lambda item, response: (str(len(response)), len(response) % 2 == 0))
    monkeypatch.setattr(C, "load_model", lambda spec: pytest.fail("a grading change loaded the model"))
    second = run(tiny, tmp_path)
    assert second.path != first.path and second.summary["reused"] and second.summary["regraded_from"] == first.path.name
    after = pq.read_table(second.path / "table.parquet").to_pylist()
    assert [r["response"] for r in after] == [r["response"] for r in before]
    assert [(r["prediction"], r["correct"]) for r in after] == [(str(len(r["response"])), len(r["response"]) % 2 == 0) for r in before]
    assert second.summary["correct"] == sum(r["correct"] for r in after)
    for a, b in zip(shard_tensors(first.path), shard_tensors(second.path)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert pq.read_table(first.path / "table.parquet").to_pylist() == before and CaptureStore(first.path).verify() == []
    assert run(tiny, tmp_path).path == second.path  # and from now on it is an ordinary cached capture
    # an older capture whose questions differ from this task's (task data changed with an old version) is not adopted
    monkeypatch.setattr(C, "GRADING_VERSION", C.GRADING_VERSION + 1)
    table = pq.read_table(second.path / "shard-00000.parquet").to_pylist()
    table[0]["question"] = "What is 1 + 1?"
    CaptureStore(second.path).write_shard(0, shard_tensors(second.path)[0], table)
    CaptureStore(second.path).finalize(3, second.summary)
    monkeypatch.setattr(C, "load_model", load_model)
    shutil.rmtree(first.path)  # leaves the altered capture as the only older one
    third = run(tiny, tmp_path)
    assert "regraded_from" not in third.summary and not third.summary["reused"]


def test_interrupted_run_resumes_from_finished_shards(tiny, tmp_path):
    lm = load_model(ModelSpec(name=str(tiny)))
    counter = CountingModel(lm, fail_on_call=3)  # shard 0 = 2 batches, then die inside shard 1
    with pytest.raises(KeyboardInterrupt):
        run(tiny, tmp_path, loaded=lm)
    [path] = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (path / "shard-00000.done.json").is_file() and not (path / "shard-00001.done.json").exists()
    assert not (path / "manifest.json").exists()
    counter.calls, counter.fail_on_call = 0, None
    result = run(tiny, tmp_path, loaded=lm)
    assert counter.calls == 3  # shard 1 (4 items: 2 batches) and shard 2 (2 items: 1 batch) only
    reference = run(tiny, tmp_path / "fresh")
    for a, b in zip(shard_tensors(result.path), shard_tensors(reference.path)):
        for name in a:
            torch.testing.assert_close(a[name], b[name])


def test_corrupt_shard_is_detected_and_recomputed(tiny, tmp_path):
    result = run(tiny, tmp_path)
    before = shard_tensors(result.path)
    target = result.path / "shard-00001.safetensors"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])  # truncated
    lm = load_model(ModelSpec(name=str(tiny)))
    counter = CountingModel(lm)
    with pytest.warns(UserWarning, match="shard 1 is corrupt"):
        again = run(tiny, tmp_path, loaded=lm)
    assert counter.calls == 2  # only shard 1's two batches
    for a, b in zip(before, shard_tensors(again.path)):
        for name in a:
            torch.testing.assert_close(a[name], b[name])
    with pytest.raises(Exception):  # the datamodule refuses to read a damaged capture it cannot repair
        (again.path / "manifest.json").unlink()
        CaptureStore(again.path).open()


def test_two_process_capture_equals_one_process(tiny, tmp_path):
    base = ["--capture.model.name", str(tiny), "--capture.task.name", "arithmetic", "--capture.task.params", '{"n": 10, "seed": 1}',
            "--capture.generation.max_new_tokens", '{"fast": 6, "slow": 10}', "--capture.generation.batch_size", "3",
            "--capture.generation.shard_size", "4", "--capture.features.prompt_window", "4"]
    [one] = main(base + ["--cache_dir", str(tmp_path / "one")])
    [two] = main(base + ["--cache_dir", str(tmp_path / "two"), "--devices", "2"])
    assert one.path.name == two.path.name  # world size is not part of the fingerprint
    for a, b in zip(shard_tensors(one.path), shard_tensors(two.path), strict=True):
        assert a.keys() == b.keys()
        for name in a:
            tol = 2e-3 if a[name].dtype == torch.float16 else 1e-5  # fp16 storage: one rounding step apart at most
            torch.testing.assert_close(a[name], b[name], rtol=tol, atol=tol)
    t1, t2 = (pq.read_table(p / "table.parquet").to_pylist() for p in (one.path, two.path))
    assert [r["response"] for r in t1] == [r["response"] for r in t2]


def test_peft_adapter_changes_captured_tensors(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny)
    torch.manual_seed(3)
    config = LoraConfig(r=4, target_modules=["k_proj", "v_proj"], init_lora_weights=False)  # random B: a real change
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    plain = run(tiny, tmp_path / "caps")
    adapted = run(tiny, tmp_path / "caps", model=ModelSpec(name=str(tiny), adapter=str(tmp_path / "adapter")))
    assert plain.path != adapted.path
    a, b = shard_tensors(plain.path)[0], shard_tensors(adapted.path)[0]
    assert not torch.allclose(a["response_kv"], b["response_kv"], atol=1e-3)


def test_datamodule_splits_by_question_and_serves_batches(tiny, tmp_path):
    dm = KVCaptureDataModule(CaptureSpec(model=ModelSpec(name=str(tiny)), task=TASK, generation=GEN, features=FeatureSpec(prompt_window=4)),
                             split=SplitSpec(0.6, 0.2, 0.2, seed=5), cache_dir=str(tmp_path), batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    qids = {name: {dm.datasets[name].rows[i]["qid"] for i in dm.datasets[name].indices} for name in ("train", "val", "test")}
    assert not (qids["train"] & qids["val"]) and not (qids["train"] & qids["test"]) and not (qids["val"] & qids["test"])
    assert sum(map(len, qids.values())) == 10 and len(qids["train"]) == 6
    batch = next(iter(dm.train_dataloader()))
    assert batch["response_kv"].dtype == torch.float32 and batch["response_kv"].shape[0] == 4
    assert batch["correct"].shape == (4,)
    traj = dm.datasets["test"].token_kv(0)
    assert traj.shape[0] == dm.datasets["test"].rows[dm.datasets["test"].indices[0]]["gen_tokens"]
    again = SplitSpec(0.6, 0.2, 0.2, seed=5).assign([f"q{i % 4}" for i in range(12)])  # repeated questions stay together
    owners = {f"q{i % 4}": name for name, idx in again.items() for i in idx}
    assert all(owners[f"q{i % 4}"] == name for name, idx in again.items() for i in idx)


def test_bad_input_is_named_and_loses_nothing(tiny, tmp_path):
    done = run(tiny, tmp_path)
    with pytest.raises(TaskError, match="unknown task 'gsm9k'.*known tasks"):
        run(tiny, tmp_path, task=TaskSpec("gsm9k"))
    with pytest.raises(FileNotFoundError, match="neither an embedded alias"):
        run(tiny, tmp_path, model=ModelSpec(name="./no-such-model"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?"}\n')
    with pytest.raises(TaskError, match=r"bad.jsonl:2: missing field 'answer'.*answer_field"):
        run(tiny, tmp_path, task=TaskSpec("jsonl", params={"path": str(bad)}))
    bad.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": 4\n')
    with pytest.raises(TaskError, match=r"bad.jsonl:2: malformed JSON"):
        run(tiny, tmp_path, task=TaskSpec("jsonl", params={"path": str(bad)}))
    bad.write_text('{"question": "  ", "answer": "2"}\n')
    with pytest.raises(TaskError, match=r"bad.jsonl:1: field 'question' is empty"):
        run(tiny, tmp_path, task=TaskSpec("jsonl", params={"path": str(bad)}))
    bad.write_text(json.dumps({"question": "1 + " * 400 + "1?", "answer": "401"}) + "\n")
    with pytest.raises(TaskError, match="item jsonl/0: prompt of .* exceeds the model's context"):
        run(tiny, tmp_path, task=TaskSpec("jsonl", params={"path": str(bad)}))
    assert CaptureStore(done.path).complete and not CaptureStore(done.path).verify()


def test_datamodule_captures_data_parallel_under_a_ddp_trainer(tiny_models, tmp_path, capfd):
    """Under a 2-process Trainer each rank captures its shards in setup; the result equals a 1-process capture."""
    from lightning import Trainer

    from kvprobe.probes import CorrectnessProbe

    parity = TaskSpec(TASK.name, params=TASK.params, grader="graders.parity")  # both classes, so the probe can train
    kw = dict(capture=CaptureSpec(model=ModelSpec(name=str(tiny_models["llama"])), task=parity, generation=GEN, features=FeatureSpec(prompt_window=4)), batch_size=4)
    dm = KVCaptureDataModule(cache_dir=str(tmp_path / "ddp"), **kw)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(CorrectnessProbe(head_pool="mean", layer_pool="mean"), dm)
    [ddp_path] = [p for p in (tmp_path / "ddp").iterdir() if p.is_dir()]
    err = capfd.readouterr().err
    assert "[rank 0]" in err and "[rank 1]" in err  # both processes captured their own shards
    single = run(tiny_models["llama"], tmp_path / "one", task=parity)
    assert ddp_path.name == single.path.name and CaptureStore(ddp_path).complete
    for a, b in zip(shard_tensors(ddp_path), shard_tensors(single.path), strict=True):
        for name in a:
            tol = 2e-3 if a[name].dtype == torch.float16 else 1e-5
            torch.testing.assert_close(a[name], b[name], rtol=tol, atol=tol)


def test_a_changed_task_file_or_the_same_relative_path_elsewhere_is_never_served_from_cache(tiny_models, tmp_path, monkeypatch):
    """The items enter the fingerprint: an edited file, or "q.jsonl" in another folder, asks its own questions."""
    tiny = tiny_models["qwen2"]
    first, second = tmp_path / "a", tmp_path / "b"
    for folder, offset in ((first, 0), (second, 50)):
        folder.mkdir()
        (folder / "q.jsonl").write_text("".join(json.dumps({"question": f"What is {offset + i} + 1?", "answer": str(offset + i + 1)}) + "\n" for i in range(4)))
    task = TaskSpec("jsonl", params={"path": "q.jsonl"})

    def questions(result):
        return [r["question"] for r in pq.read_table(result.path / "table.parquet").to_pylist()]

    monkeypatch.chdir(first)
    a = run(tiny, tmp_path / "captures", task=task)
    assert questions(a) == [f"What is {i} + 1?" for i in range(4)] and run(tiny, tmp_path / "captures", task=task).summary["reused"]
    monkeypatch.chdir(second)
    b = run(tiny, tmp_path / "captures", task=task)
    assert b.path != a.path and not b.summary["reused"] and questions(b) == [f"What is {50 + i} + 1?" for i in range(4)]
    (second / "q.jsonl").write_text(json.dumps({"question": "What is 7 * 6?", "answer": "42"}) + "\n")  # edited in place
    c = run(tiny, tmp_path / "captures", task=task)
    assert c.path not in (a.path, b.path) and not c.summary["reused"] and questions(c) == ["What is 7 * 6?"]


def test_a_model_edited_in_place_gets_another_fingerprint(tiny_models, tmp_path):
    """One MLP matrix zeroed in the middle of model.safetensors (same size, same head and tail): not the same model."""
    from safetensors.torch import save_file

    from kvprobe.models import locate

    folder = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], folder)
    before = locate(ModelSpec(name=str(folder)))[1]
    a = run(folder, tmp_path / "captures")
    weights = load_file(folder / "model.safetensors")
    size = (folder / "model.safetensors").stat().st_size
    name = "model.layers.1.mlp.up_proj.weight"
    weights[name] = torch.zeros_like(weights[name])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert (folder / "model.safetensors").stat().st_size == size
    assert locate(ModelSpec(name=str(folder)))[1] != before
    b = run(folder, tmp_path / "captures")
    assert b.path != a.path and not b.summary["reused"]


def test_a_capture_from_before_the_items_digest_is_adopted_without_generating(tiny, tmp_path, monkeypatch):
    import kvprobe.capture as C

    plain = C.capture_spec

    def without_items(*args):  # what an older kvprobe wrote
        spec = plain(*args)
        spec.pop("items")
        return spec

    monkeypatch.setattr(C, "capture_spec", without_items)
    old = run(tiny, tmp_path)
    monkeypatch.setattr(C, "capture_spec", plain)
    monkeypatch.setattr(C, "load_model", lambda spec: pytest.fail("an older capture of the same questions was regenerated"))
    new = run(tiny, tmp_path)
    assert new.path != old.path and new.summary["regraded_from"] == old.path.name
    assert [r["response"] for r in pq.read_table(new.path / "table.parquet").to_pylist()] == \
           [r["response"] for r in pq.read_table(old.path / "table.parquet").to_pylist()]
