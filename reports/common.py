"""What the reports share: the hand-written notes kept across regeneration, quiet probe fits, split outcomes, and
answering and grading without storing anything."""

from __future__ import annotations

from pathlib import Path

import torch

from kvprobe import fit, routing
from kvprobe.capture import GenerationSpec, generate_batch
from kvprobe.features import FeatureSpec
from kvprobe.models import LoadedModel
from kvprobe.study.report import with_notes
from kvprobe.prompts import PromptSpec, prompt_ids
from kvprobe.tasks import DEFAULT_CAPS, Item, grade

def write_report(out: str | Path, text: str) -> Path:
    """Write ``text`` to ``out``, keeping everything below the notes marker of the file it replaces; prints it."""
    out = Path(out)
    text = with_notes(out, text)
    out.write_text(text)
    print(text)
    return out


def quiet_cli(args: list[str], out: Path):
    """The ``kvprobe fit`` CLI of ``args`` without logger or progress bar, exporting to ``out``; nothing run yet."""
    return fit.make_cli([*args, "--export_dir", str(out), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                         "--trainer.callbacks.init_args.dirpath", str(Path("runs/lightning") / out.name)])


def quiet_fit(args: list[str], out: Path) -> tuple[dict, object]:
    """``quiet_cli`` run: (results, the CLI with its model and data)."""
    cli = quiet_cli(args, out)
    return fit.run(cli, out), cli


def split_columns(dm, name: str) -> tuple[routing.Outcomes, list[dict]]:
    """Both modes' outcomes of a difficulty data module's split, and its rows."""
    ds = dm.datasets[name]
    idx = torch.tensor(ds.indices)
    cols = {k: dm.outcomes[k][idx] for k in ("fast_correct", "slow_correct", "fast_tokens", "slow_tokens")}
    return routing.Outcomes(**cols), [ds.rows[i] for i in ds.indices]


def answer_and_grade(lm: LoadedModel, items: list[Item], prompt: PromptSpec, gen: GenerationSpec,
                     grader=None) -> tuple[list[bool], list[int]]:
    """Answer ``items`` under ``prompt`` as capture would (batches of ``gen.batch_size`` in the given order, capped
    at the mode's ``max_new_tokens``) and grade them (``grader(item, response, mode)``, default the task's grading),
    storing nothing: (correct, decoded tokens) per item."""
    grader = grader or (lambda item, response, mode: grade(item, response))
    ids = [prompt_ids(item, prompt, lm.tokenizer) for item in items]
    cap = (gen.max_new_tokens or DEFAULT_CAPS)[prompt.mode]
    correct, tokens = [], []
    for start in range(0, len(ids), gen.batch_size):
        with torch.inference_mode():
            _, new, lengths, *_ = generate_batch(lm, ids[start : start + gen.batch_size], gen, cap, FeatureSpec())
        for b, item in enumerate(items[start : start + gen.batch_size]):
            correct.append(grader(item, lm.tokenizer.decode(new[b, : int(lengths[b])], skip_special_tokens=True), prompt.mode)[1])
            tokens.append(int(lengths[b]))
    return correct, tokens
