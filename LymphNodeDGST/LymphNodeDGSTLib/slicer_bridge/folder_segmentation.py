"""The panel's "Segment all CTs in a folder": the same options as `lndgst segment INPUT_DIR
OUTPUT_DIR`, run as a `segment_folder` background job (jobs/cohort_job.py). No Qt here: the
widget asks for the two folders and shows `folder_result_text` when the job ends.
"""

from __future__ import annotations

from pathlib import Path

from LymphNodeDGSTLib.home import Home
from LymphNodeDGSTLib.jobs.events import JobInfo
from LymphNodeDGSTLib.jobs.manager import JobManager

FOLDER_JOB_KIND = "segment_folder"


def folder_job_params(home: Home, input_dir: str | Path, output_dir: str | Path,
                      model: str | None = None, device: str = "auto", fast: bool = False,
                      devices: str | None = None, part: str | None = None) -> dict:
    params = {"input_dir": str(input_dir), "output_dir": str(output_dir), "home": str(home.root),
              "device": device, "fast": bool(fast)}
    for key, value in (("model", model), ("devices", devices), ("part", part)):
        if value:
            params[key] = value
    return params


def submit_folder_segmentation(manager: JobManager, home: Home, input_dir: str | Path,
                               output_dir: str | Path, model: str | None = None,
                               device: str = "auto", fast: bool = False, devices: str | None = None,
                               part: str | None = None, python: str | None = None,
                               env: dict | None = None) -> JobInfo:
    """Check the folders and options now (a UserInputError names the problem), then start."""
    from LymphNodeDGSTLib.jobs.cohort_job import check_params

    params = folder_job_params(home, input_dir, output_dir, model, device, fast, devices, part)
    check_params(params)
    return manager.submit(FOLDER_JOB_KIND, params, device=(devices or device).split(",")[0],
                          python=python, env=env)


def folder_result_text(result: dict) -> str:
    """One line for the status label when the job is done."""
    text = (f"{result['segmented']} segmented, {result['resumed']} already done, "
            f"{result['failed']} failed; cohort table: {result['cohort_csv']}")
    if result["failures"]:
        first = result["failures"][0]
        text += f" (first failure: {Path(first['input']).name}: {first['message']})"
    return text
