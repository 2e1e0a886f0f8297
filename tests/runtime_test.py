"""Tests of the launcher body: user errors become one line, bugs keep their traceback."""

import logging

import pytest

from pvae_jax import runtime


def _record(pathname, level):
    return logging.LogRecord("absl", level, pathname, 1, "msg", None, None)


def test_user_errors_exit_with_one_line():
    def bad_config():
        raise ValueError("config.batch_size=7 does not divide by the 2 devices")

    with pytest.raises(SystemExit) as exit_info:
        runtime.run_launcher(bad_config, cpu_devices=2)
    assert str(exit_info.value.code) == (
        "error: config.batch_size=7 does not divide by the 2 devices")
    assert runtime.run_launcher(lambda: 42, cpu_devices=2) == 42


def test_bugs_are_not_swallowed():
    def bug():
        raise KeyError("params")

    with pytest.raises(KeyError):
        runtime.run_launcher(bug, cpu_devices=2)


def test_library_info_logs_are_dropped_but_warnings_kept():
    quiet = runtime._QuietLibraries()
    assert not quiet.filter(_record("/site-packages/orbax/checkpoint/x.py", logging.INFO))
    assert quiet.filter(_record("/site-packages/orbax/checkpoint/x.py", logging.WARNING))
    assert quiet.filter(_record("/work/pvae_jax/train.py", logging.INFO))
