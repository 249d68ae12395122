"""Names and numbers read from files that become paths or reach the terminal: model names, version
numbers, folds and configurations. One check for each, used wherever a file's text turns into a
folder name (an adapter's header, a checkpoint's init_args, a command-line spec)."""

from __future__ import annotations

import re

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # used with fullmatch: ASCII only
VERSION_PATTERN = re.compile(r"[0-9]+")  # ASCII digits: str.isdigit() also takes '²' and '١'
FOLD_PATTERN = re.compile(r"[0-9]{1,3}|all")  # nnU-Net's folds: 0-999 or 'all'
CONFIGURATION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def is_model_name(value: object) -> bool:
    return isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None


def is_fold_name(value: object) -> bool:
    """A fold as nnU-Net names it (`fold_0` ... `fold_all`): never a path, never '..'."""
    return isinstance(value, str) and FOLD_PATTERN.fullmatch(value) is not None


def is_configuration_name(value: object) -> bool:
    return isinstance(value, str) and CONFIGURATION_PATTERN.fullmatch(value) is not None


def is_version_number(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
