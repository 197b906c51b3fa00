"""One definition of the trial row (``sweeper.trials.TrialRow``); the service follows it."""

from __future__ import annotations

from api.db import TRIAL_FIELDS, TrialRow
from api.schemas import TrialOut


def test_the_trial_response_and_table_have_every_mirrored_field():
    assert set(TrialOut.model_fields) == {"id", *TRIAL_FIELDS, "started", "ended"}
    assert {"id", *TRIAL_FIELDS, "started", "ended"} <= set(TrialRow.__table__.columns.keys())
