"""Progress on stderr: steps timed for the report, listed with their elapsed time only when shown."""

import io

from bnrt.progress import Steps

from .conftest import EXAMPLE, run_cli


def test_steps_are_timed_and_listed_when_shown():
    buf = io.StringIO()
    with Steps(show=True, file=buf) as steps:
        with steps.step("load"):
            pass
        with steps.step("check"):
            steps.note("onnx cpu on 8 samples")
    assert list(steps.timings) == ["load", "check"] and all(t >= 0 for t in steps.timings.values())
    text = buf.getvalue()
    assert "load" in text and "check" in text and "0:00:00" in text


def test_steps_write_nothing_when_not_shown(capsys):
    with Steps(show=False) as steps:
        with steps.step("export"):
            steps.note("ignored")
    assert list(steps.timings) == ["export"]
    assert capsys.readouterr() == ("", "")


def test_fold_without_a_terminal_keeps_stderr_empty(tmp_path):
    for flags in ([], ["--quiet"]):
        proc = run_cli("fold", str(EXAMPLE), "-o", str(tmp_path / f"o{len(flags)}"), "--exporter", "torchscript", *flags)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
