"""The sweep and trial status vocabularies (no imports: the CLI and API read them cheaply)."""

STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
FINAL_STATES = ("succeeded", "failed", "cancelled")

# A trial's status in the sweep's table. ``stopped``: ended early by the scheduler (ASHA)
# or the sweep's time budget, both part of the plan, so its figures count like a finished
# trial's. ``cancelled``: cut short by a cancel; half-trained, so it is left out of seed
# means, the best configuration and the Pareto set.
TRIAL_STATES = (
    "running", "finished", "stopped", "cancelled", "failed", "retrying", "paused", "lost"
)  # fmt: skip
TRIAL_ENDED = ("finished", "stopped", "cancelled", "failed")
TRIAL_UNFINISHED = ("running", "retrying", "paused")  # a driver may still continue them
TRIAL_COUNTED = ("finished", "stopped")  # ended trials whose figures count
