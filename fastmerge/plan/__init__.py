"""From a validated config and the models' headers to what the executor runs: the frozen jobs
(:mod:`.plan`, :mod:`.jobs`), their order and stacks within the memory budget (:mod:`.schedule`), and the
whole-model statistics passes some methods need before merging (:mod:`.stats`)."""

from .jobs import Group, Job

__all__ = ["Group", "Job"]
