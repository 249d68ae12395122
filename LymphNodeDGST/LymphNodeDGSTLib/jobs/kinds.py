"""Job kinds: the names a job can be submitted under, and the check of a kind's spelling.

Shared by the manager (which refuses a bad kind at submission) and the worker (which imports the
kind's function only when it runs).
"""

from __future__ import annotations

from LymphNodeDGSTLib.errors import UserInputError

# Job kinds by name; a kind may also be given directly as "module:function".
JOB_KINDS = {
    "segment": "LymphNodeDGSTLib.jobs.segment_job:run",
    "segment_folder": "LymphNodeDGSTLib.jobs.cohort_job:run",
    "adapt": "LymphNodeDGSTLib.adaptation.adapt:run_job",
    "rank": "LymphNodeDGSTLib.jobs.rank_job:run",
}


def check_kind_name(kind: str) -> None:
    """Refuse a kind that is neither a known name nor spelled "module:function"."""
    module, sep, function = kind.partition(":")
    if kind in JOB_KINDS or (sep and module and function.isidentifier()):
        return
    raise UserInputError(f"unknown job kind '{kind}'; known kinds: {', '.join(JOB_KINDS)} "
                         "(or 'module:function')")
