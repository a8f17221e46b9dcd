"""``effray run``: the whole chain on the current Ray cluster, one stage after another.

prepare -> clean -> train the teacher -> Tune the compression space -> report -> export the
front.
Each stage is the same function its own command calls, with the preset's settings; every
stage resumes, so running the command again after an interruption continues where it
stopped (the dataset is reused, the teacher run and the Tune experiment resume by name,
an export made from the same artifact is kept).
"""

from effray.run.chain import run_all
from effray.run.front import config_summary, export_front, front_table
from effray.run.plan import RunConfig, StagePlan, plan_stages, resource_requests
from effray.run.presets import PRESETS, STAGES, load_preset
from effray.run.stages import clean_stage, val_label_issues

__all__ = [
    "PRESETS",
    "STAGES",
    "RunConfig",
    "StagePlan",
    "clean_stage",
    "config_summary",
    "export_front",
    "front_table",
    "load_preset",
    "plan_stages",
    "resource_requests",
    "run_all",
    "val_label_issues",
]
