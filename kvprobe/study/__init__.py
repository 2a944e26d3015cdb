"""``kvprobe study``: does probing pay off on this model and task? ``kvprobe.study.run.run(StudySpec(...))`` runs one
(what ``kvprobe study --config configs/study.yaml`` does); ``kvprobe.study.report`` writes what it found."""

from kvprobe.study.spec import StudySpec

__all__ = ["StudySpec"]
