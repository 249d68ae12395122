"""Batch segmentation of a folder (issue 18): bad files, resume, parts, read-ahead, devices."""

from __future__ import annotations

import csv
import threading

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_ct, tree_snapshot
from LymphNodeDGSTLib.cli.main import main
from LymphNodeDGSTLib.engine.cohort.batch import BatchSettings, segment_cases
from LymphNodeDGSTLib.engine.cohort.run import plan_cohort
from LymphNodeDGSTLib.engine.cohort.table import merge_cohort_csvs, read_cohort_csv, write_cohort_csv
from LymphNodeDGSTLib.engine.cohort.inputs import discover_cases
from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter
from LymphNodeDGSTLib.engine.store.models import ModelStore
from LymphNodeDGSTLib.engine.cohort.parts import Part, parse_part
from LymphNodeDGSTLib.errors import UserInputError

SMALL = (12, 48, 48)  # one sliding-window tile of the tiny model


def write_cohort(folder, n: int, first_seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sitk.WriteImage(make_ct(shape_zyx=SMALL, seed=first_seed + i), str(folder / f"ct{i:02d}.nii.gz"))
    return folder


def rows_of(path):
    with open(path, newline="") as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


def settings_for(home, **extra) -> BatchSettings:
    return BatchSettings(str(home / "models"), "tiny", fast=True, **extra)


def test_batch_over_a_folder_with_bad_files_reports_them_and_segments_the_rest(installed_home, tmp_path, capsys):
    """Mutation caught: a bad file that stops the batch (re-raising in the read-ahead thread), or a
    failed case missing from the cohort CSV."""
    inputs = write_cohort(tmp_path / "in", 2)
    (inputs / "sub").mkdir()
    sitk.WriteImage(make_ct(shape_zyx=SMALL, seed=7), str(inputs / "sub" / "ct.nrrd"))
    (inputs / "broken.nii.gz").write_bytes(b"not an image")
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkInt16), str(inputs / "flat.nrrd"))  # 2D among 3D
    (inputs / "notes.txt").write_text("ignored")
    out = tmp_path / "out"

    rc = main(["--home", str(installed_home), "segment", str(inputs), str(out), "--fast", "--device", "cpu"])
    err = capsys.readouterr().err

    assert rc == 1  # the batch ran, some cases failed
    rows = rows_of(out / "cohort.csv")
    assert set(rows) == {"broken", "ct00", "ct01", "flat", "sub__ct"}
    assert rows["broken"]["status"] == "failed" and "cannot read" in rows["broken"]["message"]
    assert rows["flat"]["status"] == "failed" and "is 2D" in rows["flat"]["message"]
    for name in ("ct00", "ct01", "sub__ct"):
        assert rows[name]["status"] == "segmented" and rows[name]["model_version"] == "tiny@1"
        label = sitk.ReadImage(str(out / f"{name}.nii.gz"))
        assert label.GetSize() == SMALL[::-1]
        nodes = list(csv.DictReader(open(out / f"{name}.nodes.csv")))
        assert int(rows[name]["nodes"]) == len(nodes)
        volume = sum(float(n["volume_mm3"]) for n in nodes)
        assert float(rows[name]["total_volume_mm3"]) == pytest.approx(volume, abs=0.05 * len(nodes) + 0.01)
    assert not (out / "broken.nii.gz").exists()
    assert "eta" in err and "broken.nii.gz" in err


def test_resume_skips_finished_cases_by_content_hash_and_model_version(installed_home, tmp_path,
                                                                       tiny_model_folder, monkeypatch):
    """Mutations caught: resuming by file name alone (a changed CT is not redone); ignoring the
    model version (a new version reuses old labels); trusting a record whose label is gone."""
    inputs = write_cohort(tmp_path / "in", 3)
    out = tmp_path / "out"
    settings = settings_for(installed_home)
    cases = discover_cases(inputs).cases
    first = segment_cases(cases, out, settings, "cpu")
    assert [r.status for r in first] == ["segmented"] * 3

    calls = []
    original = Segmenter.segment_prepared
    monkeypatch.setattr(Segmenter, "segment_prepared",
                        lambda self, prepared, **kw: calls.append(prepared) or original(self, prepared, **kw))
    again = segment_cases(discover_cases(inputs).cases, out, settings, "cpu")
    assert [r.status for r in again] == ["resumed"] * 3 and calls == []
    assert [r.nodes for r in again] == [r.nodes for r in first]

    sitk.WriteImage(make_ct(shape_zyx=SMALL, seed=99), str(inputs / "ct01.nii.gz"))  # new voxels, same name
    (out / "ct02.nii.gz").unlink()  # an output lost since: redo, whatever the record says
    third = {r.case: r.status for r in segment_cases(discover_cases(inputs).cases, out, settings, "cpu")}
    assert third == {"ct00": "resumed", "ct01": "segmented", "ct02": "segmented"}

    store = ModelStore(installed_home / "models")
    store.add_version("tiny", tiny_model_folder, {"kind": "test"}, activate_if_first=False)
    newer = {r.case: r.status for r in segment_cases(discover_cases(inputs).cases, out,
                                                     BatchSettings(str(installed_home / "models"), "tiny@2",
                                                                   fast=True), "cpu")}
    assert set(newer.values()) == {"segmented"}


def test_next_case_is_prepared_while_the_network_runs(installed_home, tmp_path, monkeypatch):
    """Mutation caught: a pipeline without read-ahead (prepare and network in turn on one thread):
    the network on case 1 then waits for a preparation that never starts, and the test fails."""
    inputs = write_cohort(tmp_path / "in", 2)
    second_prepare_started = threading.Event()
    prepared_names = []
    original_prepare, original_run = Segmenter.prepare, Segmenter.segment_prepared

    def prepare(self, image, **kw):
        prepared_names.append(threading.current_thread().name)
        if len(prepared_names) == 2:
            second_prepare_started.set()
        return original_prepare(self, image, **kw)

    def run(self, prepared, **kw):
        if len(prepared_names) == 1:  # network on case 1: case 2 must be under way meanwhile
            assert second_prepare_started.wait(timeout=120), "no read-ahead"
        return original_run(self, prepared, **kw)

    monkeypatch.setattr(Segmenter, "prepare", prepare)
    monkeypatch.setattr(Segmenter, "segment_prepared", run)
    rows = segment_cases(discover_cases(inputs).cases, tmp_path / "out", settings_for(installed_home), "cpu")
    assert [r.status for r in rows] == ["segmented", "segmented"]
    assert set(prepared_names) == {"lndgst-prefetch"}


def test_file_names_that_are_not_utf8_never_abort(installed_home, tmp_path):
    """Issue 26, item 4. Catches: a CT or an output whose name holds a byte that is not UTF-8
    reaching SimpleITK, which aborts the whole process (SIGABRT, exit 134: the batch wrote no
    cohort.csv, a 0-byte temporary file stayed). Run as real processes, so an abort fails the test
    instead of killing it. A single-file CT is read through a link under a plain name."""
    import os

    from conftest import run_cli

    def bad(folder, name: str):
        return folder / os.fsdecode(name.encode().replace(b"BAD", b"\xff"))

    inputs = write_cohort(tmp_path / "in", 2)
    (inputs / "ct00.nii.gz").rename(bad(inputs, "ctBAD.nii.gz"))
    out = tmp_path / "out"
    batch = run_cli("segment", str(inputs), str(out), "--fast", "--device", "cpu", home=installed_home)
    assert batch.returncode == 0 and "Traceback" not in batch.stderr, batch.stderr
    rows = rows_of(out / "cohort.csv")  # UTF-8 text: the byte shown as \xff
    assert {name: row["status"] for name, row in rows.items()} == {"ct\\xff": "segmented", "ct01": "segmented"}
    assert (out / "ct\\xff.nii.gz").is_file()

    output = bad(tmp_path, "labelBAD.nii.gz")
    single = run_cli("segment", str(bad(inputs, "ctBAD.nii.gz")), str(output), "--fast", "--device", "cpu",
                     home=installed_home)
    assert single.returncode == 0, single.stderr
    import shutil
    plain = shutil.copy(output, tmp_path / "label-copy.nii.gz")  # Python takes any bytes; ITK may not
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(plain))).shape == SMALL
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_parts_cover_the_folder_exactly_once_and_merge(tmp_path):
    """Mutations caught: a share that skips or repeats a case (e.g. `[K::N]` instead of
    `[K-1::N]`); a merge that accepts a missing part or a case in two parts."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(11):
        sitk.WriteImage(sitk.Image(2, 2, 2, sitk.sitkInt16), str(inputs / f"p{i:02d}.nrrd"))
    whole = [c.name for c in plan_cohort(inputs, tmp_path / "out").cases]
    shares = [[c.name for c in plan_cohort(inputs, tmp_path / "out", parse_part(f"{k}/3")).cases]
              for k in (1, 2, 3)]
    assert sorted(sum(shares, [])) == sorted(whole) and len(whole) == 11
    assert sorted(len(s) for s in shares) == [3, 4, 4]
    assert shares == [[c.name for c in plan_cohort(inputs, tmp_path / "out", Part(k, 3)).cases]
                      for k in (1, 2, 3)]  # deterministic

    out = tmp_path / "out"
    out.mkdir()
    from LymphNodeDGSTLib.engine.cohort.table import CohortRow
    for k, share in enumerate(shares, 1):
        write_cohort_csv([CohortRow(name, "segmented", 1, 10.0, 5.0, "tiny@1", 1.0) for name in share],
                         out / f"cohort.part-{k}-of-3.csv")
    merged = merge_cohort_csvs([out], tmp_path / "all.csv")
    assert [r.case for r in merged] == sorted(whole)
    assert [r.case for r in read_cohort_csv(tmp_path / "all.csv")] == sorted(whole)
    (out / "cohort.part-2-of-3.csv").unlink()
    with pytest.raises(UserInputError, match="parts 2 of 3 are missing"):
        merge_cohort_csvs([out], tmp_path / "all2.csv")
    write_cohort_csv([CohortRow(shares[0][0], "segmented")], out / "cohort.part-2-of-3.csv")
    with pytest.raises(UserInputError, match="is in both"):
        merge_cohort_csvs([out], tmp_path / "all3.csv")


def test_case_names_are_unique_stable_and_named_by_the_file(tmp_path):
    """Issue 26, items 3 and 25. Catches: `sub/b.nii.gz` and `sub__b.nii.gz` both named `sub__b`
    (one label overwritten, two CSV rows for one file, both redone on every run), and a dangling
    link named `dang.nii.gz` (its suffix kept because it is not a file)."""
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    for name in ("sub/b.nii.gz", "sub__b.nii.gz", "a.nii", "a.nrrd"):
        sitk.WriteImage(sitk.Image(2, 2, 2, sitk.sitkInt16), str(inputs / name))
    (inputs / "dang.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    cases = discover_cases(inputs).cases
    names = {c.path.relative_to(inputs).as_posix(): c.name for c in cases}
    assert len(set(names.values())) == len(names) == 5, names
    assert names["dang.nii.gz"] == "dang" and names["a.nii"] == "a.nii" and names["a.nrrd"] == "a.nrrd"
    assert names["sub/b.nii.gz"].startswith("sub__b.nii.gz-") and names["sub__b.nii.gz"].startswith("sub__b.nii.gz-")
    assert {c.path: c.name for c in discover_cases(inputs).cases} == {c.path: c.name for c in cases}  # stable


MERGE_PROBLEMS = {
    "nodes not a number": ("cohort.part-1-of-1.csv", {"nodes": "abc"}, "is not a number"),
    "negative count": ("cohort.part-1-of-1.csv", {"nodes": "-3"}, ">= 0"),
    "NaN volume": ("cohort.part-1-of-1.csv", {"total_volume_mm3": "nan"}, "finite"),
    "unknown status": ("cohort.part-1-of-1.csv", {"status": "fine"}, "is not one of"),
    "short row": ("cohort.part-1-of-1.csv", "short", "fewer fields"),
    "not UTF-8": ("cohort.part-1-of-1.csv", b"case,status\n\xff\xfe\n", "not UTF-8"),
    "huge field": ("cohort.part-1-of-1.csv", {"message": "x" * 2_000_000}, "not a cohort CSV"),
    "part 3 of 2": ("cohort.part-3-of-2.csv", {}, "cannot exist"),
    "part 0 of 0": ("cohort.part-0-of-0.csv", {}, "cannot exist"),
}


@pytest.mark.parametrize("problem", list(MERGE_PROBLEMS), ids=list(MERGE_PROBLEMS))
def test_cohort_merge_refuses_what_is_not_a_cohort_part(problem, tmp_path):
    """Issue 26, items 10 and 15. Catches: `nodes=abc`, non-UTF-8 bytes and a field over 131,072
    characters ending in tracebacks; short rows, unknown statuses, negative counts and NaN merged
    as if valid; forged part names (3 of 2, 0 of 0) accepted."""
    from LymphNodeDGSTLib.engine.cohort.table import COLUMNS, CohortRow

    name, change, message = MERGE_PROBLEMS[problem]
    parts = tmp_path / "parts"
    parts.mkdir()
    path = parts / name
    write_cohort_csv([CohortRow("a", "segmented", 1, 10.0, 5.0, "tiny@1", 1.0)], path)
    if isinstance(change, bytes):
        path.write_bytes(change.replace(b"case,status", ",".join(COLUMNS).encode()))
    elif change == "short":
        path.write_text(",".join(COLUMNS) + "\na,segmented,1\n")
    elif change:
        row = dict(zip(COLUMNS, path.read_text().splitlines()[1].split(",")))
        path.write_text(",".join(COLUMNS) + "\n" + ",".join({**row, **change}.values()) + "\n")
    with pytest.raises(UserInputError, match=message):
        merge_cohort_csvs([path], tmp_path / "all.csv")
    assert not (tmp_path / "all.csv").exists()


def test_cohort_merge_output_rules_and_a_subset_by_name(tmp_path):
    """Issue 26, items 10 and 15. Catches: `-o` naming an existing folder (IsADirectoryError),
    `-o` overwriting one of its own parts, and the hint "name the files to merge" not working
    (explicitly named part files were still checked for completeness)."""
    from LymphNodeDGSTLib.engine.cohort.table import CohortRow

    parts = tmp_path / "parts"
    parts.mkdir()
    for k in (1, 2, 3):
        write_cohort_csv([CohortRow(f"case{k}", "segmented", 1)], parts / f"cohort.part-{k}-of-3.csv")
    with pytest.raises(UserInputError, match="is a folder"):
        merge_cohort_csvs([parts], tmp_path)
    own = parts / "cohort.part-1-of-3.csv"
    before = own.read_bytes()
    with pytest.raises(UserInputError, match="one of the CSVs being merged"):
        merge_cohort_csvs([parts], own)
    assert own.read_bytes() == before
    (parts / "cohort.part-3-of-3.csv").unlink()
    with pytest.raises(UserInputError, match="parts 3 of 3 are missing; run them, or name the part files"):
        merge_cohort_csvs([parts], tmp_path / "all.csv")
    merged = merge_cohort_csvs([parts / "cohort.part-1-of-3.csv", parts / "cohort.part-2-of-3.csv"],
                               tmp_path / "all.csv")
    assert [r.case for r in merged] == ["case1", "case2"]


@pytest.mark.parametrize("spec", ["3/2", "0/0", "0/3", "1/0", "a/b", "2", "1/99999999999999999999999",
                                  "1/100001", "\u0661/\u0662"])
def test_bad_part_specs_are_refused(spec):
    """Mutation caught: the 1 <= K <= N check dropped (3/2 and 0/3 would be accepted). Issue 26,
    items 10 and 26: a 23-digit N accepted, and Arabic-Indic digits read as 1/2 by `\\d`."""
    with pytest.raises(UserInputError, match="--part"):
        parse_part(spec)


BAD_BATCH_INPUTS = {
    "empty folder": (lambda d: [], "no CT images or DICOM series"),
    "output inside input": (lambda d: ["--part", "1/1"], "inside the input folder"),
    "part 3/2": (lambda d: ["--part", "3/2"], "K must be between 1 and N"),
    "part 0/0": (lambda d: ["--part", "0/0"], "N must be from 1"),
    "absent GPU": (lambda d: ["--devices", "cuda:0,cuda:1"], "requested but"),
    "empty device": (lambda d: ["--devices", "cpu,"], "empty device name"),
}


@pytest.mark.parametrize("case", sorted(BAD_BATCH_INPUTS))
def test_bad_batch_input_is_exit_2_one_line_and_writes_nothing(installed_home, tmp_path, capsys, case):
    """Nothing can run: exit 2, one line, no output folder, before any model is loaded."""
    import torch
    if case == "absent GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    inputs = tmp_path / "in"
    inputs.mkdir()
    if case != "empty folder":
        sitk.WriteImage(make_ct(shape_zyx=SMALL), str(inputs / "ct.nii.gz"))
    out = inputs / "labels" if case == "output inside input" else tmp_path / "out"
    before = tree_snapshot(tmp_path)
    extra, message = BAD_BATCH_INPUTS[case]
    rc = main(["--home", str(installed_home), "segment", str(inputs), str(out), *extra(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert tree_snapshot(tmp_path) == before and not out.exists()


def test_two_cpu_workers_give_the_same_labels_as_one(installed_home, tmp_path):
    """`--devices cpu,cpu`: two spawned workers, each case once. Mutation caught: workers given
    the same share (every case twice, one missing) or rows lost on the way back."""
    inputs = write_cohort(tmp_path / "in", 2)
    one = segment_cases(discover_cases(inputs).cases, tmp_path / "one", settings_for(installed_home), "cpu")
    rc = main(["--home", str(installed_home), "segment", str(inputs), str(tmp_path / "two"), "--fast",
               "--devices", "cpu,cpu"])
    assert rc == 0
    rows = rows_of(tmp_path / "two" / "cohort.csv")
    assert sorted(rows) == [r.case for r in one] and {r["status"] for r in rows.values()} == {"segmented"}
    for row in one:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "one" / f"{row.case}.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "two" / f"{row.case}.nii.gz")))
        assert np.array_equal(a, b)

