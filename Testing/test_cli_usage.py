"""Usage errors of the `lndgst` command line: help on stderr, an empty --home (issue 12)."""

from __future__ import annotations

from LymphNodeDGSTLib.cli import main as cli


def test_no_command_prints_help_on_stderr(capsys):
    """Catches the help of a usage error going to stdout (where a script reads results)."""
    status = cli.main([])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == "" and "usage: lndgst" in captured.err


def test_empty_home_is_refused(capsys, tmp_path, monkeypatch):
    """Catches `--home ""` silently meaning the default home."""
    monkeypatch.setenv("LNDGST_HOME", str(tmp_path / "env-home"))
    status = cli.main(["--home", "", "cases", "list"])
    captured = capsys.readouterr()
    assert status == 2 and "--home is empty" in captured.err and captured.out == ""
    assert not (tmp_path / "env-home").exists()
