"""The panel's "Segment all CTs in a folder": the segment_folder job kind and its bridge."""

from __future__ import annotations

import csv
import json

import pytest
import SimpleITK as sitk

from conftest import make_ct, tree_snapshot
from LymphNodeDGSTLib.errors import Cancelled, UserInputError
from LymphNodeDGSTLib.home import Home
from LymphNodeDGSTLib.jobs import cohort_job
from LymphNodeDGSTLib.jobs.manager import JobManager
from LymphNodeDGSTLib.jobs.events import Reporter
from LymphNodeDGSTLib.slicer_bridge.folder_segmentation import (folder_job_params, folder_result_text,
                                                                submit_folder_segmentation)

SMALL = (12, 48, 48)


def folder_with_cases(root, good: int = 2, bad: bool = True):
    root.mkdir()
    for i in range(good):
        sitk.WriteImage(make_ct(shape_zyx=SMALL, seed=i), str(root / f"ct{i}.nii.gz"))
    if bad:
        (root / "bad.nii.gz").write_bytes(b"junk")
    return root


def events_of(job_folder):
    return [json.loads(line) for line in (job_folder / "events.ndjson").read_text().splitlines()]


def test_folder_job_segments_reports_progress_per_case_and_names_the_cohort_csv(installed_home, tmp_path):
    """Mutation caught: progress not reported per case (the panel's bar would stand still), or
    failures dropped from the result the panel shows."""
    inputs = folder_with_cases(tmp_path / "cts")
    job = tmp_path / "job"
    job.mkdir()
    params = folder_job_params(Home(installed_home), inputs, tmp_path / "labels", "tiny", "cpu", fast=True)
    result = cohort_job.run(params, Reporter(job, min_interval_s=0))

    assert (result["segmented"], result["resumed"], result["failed"]) == (2, 0, 1)
    assert result["failures"][0]["input"].endswith("bad.nii.gz")
    rows = list(csv.DictReader(open(result["cohort_csv"])))
    assert sorted(r["case"] for r in rows) == ["bad", "ct0", "ct1"]
    progress = [e for e in events_of(job) if e["type"] == "progress" and e.get("stage") == "cases"]
    assert [e["done"] for e in progress] == [0, 1, 2, 3] and {e["total"] for e in progress} == {3}
    assert "2 segmented, 0 already done, 1 failed" in folder_result_text(result)

    again = cohort_job.run(params, Reporter(tmp_path / "job", min_interval_s=0))
    assert (again["segmented"], again["resumed"]) == (0, 2)


def test_folder_job_cancelled_before_a_case_finishes_writes_no_label(installed_home, tmp_path):
    inputs = folder_with_cases(tmp_path / "cts", bad=False)
    job = tmp_path / "job"
    job.mkdir()
    reporter = Reporter(job)
    reporter.cancel_event.set()
    params = folder_job_params(Home(installed_home), inputs, tmp_path / "labels", "tiny", "cpu", fast=True)
    with pytest.raises(Cancelled):
        cohort_job.run(params, reporter)
    assert not list((tmp_path / "labels").glob("*.nii.gz"))


@pytest.mark.parametrize("setup, message", [
    (lambda tmp: (tmp / "empty").mkdir() or (tmp / "empty", tmp / "out", None), "no CT images"),
    (lambda tmp: (folder_with_cases(tmp / "cts"), tmp / "cts" / "out", None), "inside the input"),
    (lambda tmp: (folder_with_cases(tmp / "cts"), tmp / "out", "3/2"), "--part"),
])
def test_submit_refuses_bad_folders_before_starting_a_job(installed_home, tmp_path, setup, message):
    inputs, output, part = setup(tmp_path)
    manager = JobManager(installed_home / "jobs")
    before = tree_snapshot(installed_home)
    with pytest.raises(UserInputError, match=message):
        submit_folder_segmentation(manager, Home(installed_home), inputs, output, "tiny", "cpu", part=part)
    assert tree_snapshot(installed_home) == before and not output.exists()
