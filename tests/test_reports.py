"""The report writers and experiments (reports/): each is a module with a main() that answers --help without work,
and the notes below the marker of a regenerated report survive."""

import importlib
import pkgutil

import pytest

import reports
import reports.experiments
from kvprobe.study.report import NOTES
from reports.common import write_report

MODULES = [f"reports.{m.name}" for m in pkgutil.iter_modules(reports.__path__) if m.name not in ("common", "experiments")] + \
          [f"reports.experiments.{m.name}" for m in pkgutil.iter_modules(reports.experiments.__path__)]


def test_every_report_and_experiment():
    assert {"reports.correctness", "reports.difficulty", "reports.steering"} <= set(MODULES) and len(MODULES) >= 7


@pytest.mark.parametrize("name", MODULES)
def test_main_answers_help(name, capsys):
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0 and f"python -m {name}" in capsys.readouterr().out


def test_write_report_keeps_the_hand_written_notes(tmp_path, capsys):
    out = tmp_path / "report.md"
    write_report(out, "# first\n")
    out.write_text(out.read_text() + "\n" + NOTES + "\nkept by hand\n")
    write_report(out, "# second\n")
    assert out.read_text() == "# second\n\n" + NOTES + "\nkept by hand\n"
