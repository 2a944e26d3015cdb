"""Task registry, prompts and grading."""

import pytest

from conftest import make_tokenizer, real_assets_available
from kvprobe.prompts import PromptSpec, prompt_ids, uses_template_switch
from kvprobe.tasks import Item, TaskError, TaskSpec, final_answer_text, grade, grade_choice, grade_math, load_items

needs_assets = pytest.mark.skipif(not real_assets_available(), reason="registry data not installed (scripts/setup.sh)")


def test_arithmetic_is_seeded_and_exact():
    a = load_items(TaskSpec("arithmetic", params={"n": 50, "seed": 3, "terms": 3, "digits": 2}))
    b = load_items(TaskSpec("arithmetic", params={"n": 50, "seed": 3, "terms": 3, "digits": 2}))
    c = load_items(TaskSpec("arithmetic", params={"n": 50, "seed": 4, "terms": 3, "digits": 2}))
    assert a == b and a != c
    for item in a:
        expr = item.question.removeprefix("What is ").removesuffix("?")
        assert len(expr.split()) == 5 and str(eval(expr)) == item.gold
    assert len({i.question for i in a}) == 50  # distinct: a repeat would straddle train and test
    with pytest.raises(TaskError, match="only 243 distinct questions"):
        load_items(TaskSpec("arithmetic", params={"n": 300}))
    with pytest.raises(TaskError, match="operators"):
        load_items(TaskSpec("arithmetic", params={"operators": "/"}))
    assert len(load_items(TaskSpec("arithmetic", limit=5, offset=10))) == 5


def test_arithmetic_min_digits_draws_digit_counts_evenly():
    def operands(params):
        items = load_items(TaskSpec("arithmetic", params=params))
        return items, [int(x) for i in items for x in i.question.removeprefix("What is ").removesuffix("?").split()[::2]]

    items, mixed = operands({"n": 400, "seed": 1, "digits": 2, "min_digits": 1})
    assert 0.4 < sum(x < 10 for x in mixed) / len(mixed) < 0.6 and max(mixed) <= 99
    assert items[0].qid.startswith("arithmetic/1-2-1to2-+-*/")  # its own id family: never collides with digits=2
    _, uniform = operands({"n": 400, "seed": 1, "digits": 2})
    assert sum(x < 10 for x in uniform) / len(uniform) < 0.2  # 1-99 uniform: ~9% one-digit
    _, three = operands({"n": 200, "seed": 1, "digits": 3})
    assert 10 <= min(three) and max(three) <= 999  # without min_digits, digits=3 keeps its 10-999 range
    with pytest.raises(TaskError, match="min_digits"):
        load_items(TaskSpec("arithmetic", params={"digits": 2, "min_digits": 3}))
    # one-digit space: 9 one-digit + 90 two-digit values per operand, as many as digits=2 alone (1-99)
    with pytest.raises(TaskError, match="only 29403 distinct questions"):
        load_items(TaskSpec("arithmetic", params={"n": 30000, "digits": 2, "min_digits": 1}))


@needs_assets
@pytest.mark.parametrize("name, count", [("gsm8k", 1319), ("math500", 500), ("math", 4500), ("arc_easy", 2376),
                                         ("arc_challenge", 1172), ("commonsense_qa", 1221), ("asdiv", 2305)])
def test_registry_tasks_load_real_data(name, count):
    items = load_items(TaskSpec(name))
    assert len(items) == count
    if name in ("arc_easy", "arc_challenge", "commonsense_qa"):
        assert all(item.choices and item.gold in "ABCDE"[: len(item.choices)] for item in items)
    else:
        assert all(item.gold and not item.choices for item in items)


@needs_assets
def test_math_training_pool_excludes_math500():
    held_out = {i.question.strip() for i in load_items(TaskSpec("math500"))}
    assert not held_out & {i.question.strip() for i in load_items(TaskSpec("math"))}
    assert load_items(TaskSpec("math500"))[0].gold == r"\left( 3, \frac{\pi}{2} \right)"  # not the mangled "\le(" field


@pytest.mark.parametrize("response, gold, expected", [
    ("16 - 3 - 4 = 9, and 9 * 2 = 18.\nAnswer: 18", "18", True),
    ("The answer is $\\frac{1}{2}$.", "\\frac12", True),
    ("3 + 4 = 7", "7", True),
    ("3 + 4 = 7", "3", False),
    ("Answer: 1,000", "1000", True),
    ("Answer: 0.5", "\\frac{1}{2}", True),
    ("I don't know.", "4", False),
])
def test_grade_math(response, gold, expected):
    assert grade_math(response, gold)[1] is expected


def test_grade_choice_and_extraction_failures():
    choices = ("bank", "library", "mall")
    assert grade_choice("B. library", "B", choices) == ("B", True)
    assert grade_choice("The answer is (A) bank", "B", choices) == ("A", False)
    assert grade_choice("Answer: C", "C", choices) == ("C", True)
    assert grade_choice("It must be the library.", "B", choices) == ("B", True)  # the choice quoted verbatim
    assert grade_choice("No idea, sorry.", "B", choices) == ("", False)  # an extraction failure
    assert grade_choice("A. bank\nB. library\nC. mall", "C", choices) == ("", False)  # a listing names no choice
    assert grade_choice("F. other", "B", choices)[0] == ""  # not one of the choices
    assert final_answer_text("work...\nAnswer: 42") == "42"
    assert final_answer_text("51 - 8 = 43\n\nAnswer: <answer>43</answer>") == "43"
    assert grade(Item("q", "?", "43"), "51 - 8 = 43\n\nAnswer: <answer>43</answer>") == ("43", True)
    assert grade(Item("q", "?", "43"), "<answer>42</answer>") == ("42", False)
    assert grade(Item("q", "?", "B", choices), "B. library") == ("B", True)


def test_jsonl_task_fields(tmp_path):
    f = tmp_path / "qs.jsonl"
    f.write_text('{"q": "Pick one", "a": 1, "opts": ["x", "y"], "id": "k1"}\n\n{"q": "Pick", "a": "A", "opts": ["x", "y"], "id": "k2"}\n')
    items = load_items(TaskSpec("jsonl", params={"path": str(f), "question_field": "q", "answer_field": "a", "choices_field": "opts", "id_field": "id"}))
    assert [(i.qid, i.gold, i.choices) for i in items] == [("jsonl/k1", "B", ("x", "y")), ("jsonl/k2", "A", ("x", "y"))]
    with pytest.raises(TaskError, match="needs params.path"):
        load_items(TaskSpec("jsonl"))
    f.write_text('{"q": "Pick", "a": "C", "opts": ["x", "y"]}\n')
    with pytest.raises(TaskError, match="neither a letter nor an index"):
        load_items(TaskSpec("jsonl", params={"path": str(f), "question_field": "q", "answer_field": "a", "choices_field": "opts"}))
    f.write_text('{"q": "a", "a": "1", "id": 1}\n{"q": "b", "a": "2", "id": 1}\n')
    with pytest.raises(TaskError, match="appears twice"):
        load_items(TaskSpec("jsonl", params={"path": str(f), "question_field": "q", "answer_field": "a", "id_field": "id"}))


def test_hf_task_reads_any_datasets_source_with_a_column_mapping(tmp_path):
    import datasets

    rows = {"problem": ["What is 2 + 2?", "Pick one", "What is 3 * 3?"], "solution": ["4", "1", "9"], "uid": ["a", "b", "c"]}
    data = datasets.Dataset.from_dict(rows)
    data.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": data.select([0]), "test": data}).save_to_disk(str(tmp_path / "dict"))
    data.to_parquet(str(tmp_path / "qs.parquet"))
    data.to_csv(str(tmp_path / "qs.csv"), index=False)
    data.to_json(str(tmp_path / "qs.jsonl"))
    mapping = {"question_field": "problem", "answer_field": "solution", "id_field": "uid"}
    expected = [("hf/a", "What is 2 + 2?", "4"), ("hf/b", "Pick one", "1"), ("hf/c", "What is 3 * 3?", "9")]
    for source in ("saved", "dict", "qs.parquet", "qs.csv", "qs.jsonl"):
        items = load_items(TaskSpec("hf", params={"path": str(tmp_path / source), "split": "test", **mapping}))
        assert [(i.qid, i.question, i.gold) for i in items] == expected, source
    first = load_items(TaskSpec("hf", limit=1, params={"path": str(tmp_path / "dict"), "split": "train", **mapping}))
    assert [i.qid for i in first] == ["hf/a"]
    with pytest.raises(TaskError, match=r"no column 'question' \(params.question_field\); its columns: \['problem', 'solution', 'uid'\]"):
        load_items(TaskSpec("hf", params={"path": str(tmp_path / "qs.parquet")}))
    with pytest.raises(TaskError, match=r"splits \['test', 'train'\], not 'validation'"):
        load_items(TaskSpec("hf", params={"path": str(tmp_path / "dict"), "split": "validation", **mapping}))
    with pytest.raises(TaskError, match="needs params.path"):
        load_items(TaskSpec("hf"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(TaskError, match="is not a"):
        load_items(TaskSpec("hf", params={"path": str(tmp_path / "notes.txt"), **mapping}))


def test_hf_task_offline_names_the_source_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TaskError, match="'someone/no-such-dataset' is not a local file or folder, and the hub is offline"):
        load_items(TaskSpec("hf", params={"path": "someone/no-such-dataset"}))


def test_prompt_modes_and_template_switch():
    tok = make_tokenizer()
    item = Item("q", "What is 2 + 2?", "4")
    fast, slow = (tok.decode(prompt_ids(item, PromptSpec(mode=m), tok)) for m in ("fast", "slow"))
    assert "only the final answer" in fast and "step by step" in slow and slow.endswith("<|im_start|>assistant\n")
    choice = tok.decode(prompt_ids(Item("c", "Which?", "A", ("x", "y")), PromptSpec(mode="fast"), tok))
    assert "A. x\nB. y" in choice and "letter and the text" in choice
    assert not uses_template_switch(PromptSpec(), tok)
    tok.chat_template = "{% if enable_thinking %}<think>{% endif %}" + tok.chat_template  # a hybrid thinking template
    assert uses_template_switch(PromptSpec(), tok)
    assert "<think>" in tok.decode(prompt_ids(item, PromptSpec(mode="slow"), tok))
    assert "<think>" not in tok.decode(prompt_ids(item, PromptSpec(mode="fast"), tok))
    with pytest.raises(ValueError, match="mode"):
        PromptSpec(mode="medium")


def test_token_caps_default_to_what_the_task_needs(tiny_models, tmp_path):
    from kvprobe.capture import CaptureSpec, GenerationSpec, capture
    from kvprobe.features import FeatureSpec
    from kvprobe.models import ModelSpec
    from kvprobe.store import CaptureStore
    from kvprobe.tasks import DEFAULT_CAPS, default_caps

    assert default_caps(TaskSpec("gsm8k"))["slow"] == 512 and default_caps(TaskSpec("arithmetic")) == DEFAULT_CAPS
    mix = TaskSpec("mix", params={"parts": [{"name": "arithmetic"}, {"name": "gsm8k", "limit": 3}]})
    assert default_caps(mix) == {"fast": 32, "slow": 512}
    result = capture(CaptureSpec(ModelSpec(name=str(tiny_models["qwen2"])), TaskSpec("arithmetic", params={"n": 3}),
                                 generation=GenerationSpec(batch_size=3), features=FeatureSpec(prompt_window=2)), tmp_path, verbose=False)
    assert CaptureStore(result.path).spec()["generation"]["max_new_tokens"] == DEFAULT_CAPS  # recorded resolved
