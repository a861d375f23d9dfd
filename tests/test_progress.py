"""sparse_grad.progress: one display for the demo and the benchmarks, redrawn on a terminal (tqdm
where installed) and written as whole lines in a pipe or a log."""
import pytest

from sparse_grad import progress as progress_module
from sparse_grad.progress import Progress


class FakeStream:
    def __init__(self, tty):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def run(bar, n=7):
    with bar:
        for i in range(n):
            bar.update(1, note=f"loss {i}")


def test_redraws_in_place_on_a_terminal_without_tqdm(monkeypatch):
    monkeypatch.setattr(progress_module, "_tqdm", lambda: None)  # as where tqdm is not installed
    stream = FakeStream(True)
    run(Progress(7, "work", stream=stream, width=7, min_interval=0.0))
    lines = stream.text.split("\n")
    assert lines[-1] == "" and len(lines) == 2  # one line, ended once
    final = lines[0].split("\r")[-1]
    assert final.startswith("[#######] 7/7 work") and final.removesuffix("\x1b[K").endswith("loss 6")
    assert stream.text.count("\r") == 8  # every update redrawn, plus the close


def test_uses_tqdm_on_a_terminal_where_installed():
    pytest.importorskip("tqdm")
    stream = FakeStream(True)
    bar = Progress(7, "work", stream=stream, min_interval=0.0)
    assert bar._tqdm is not None
    run(bar)
    assert "7/7" in stream.text and "work" in stream.text and "loss 6" in stream.text
    assert stream.text.endswith("\n")


@pytest.mark.parametrize("use_tqdm", [None, True, False])
def test_a_pipe_gets_whole_lines_and_no_carriage_returns(use_tqdm):
    stream = FakeStream(False)
    run(Progress(7, "work", stream=stream, width=7, use_tqdm=use_tqdm))
    assert "\r" not in stream.text and "\x1b" not in stream.text
    assert stream.text.count("\n") == 1 and stream.text.startswith("[#######] 7/7 work")
    assert stream.text.rstrip("\n").endswith("loss 6")


def test_a_log_hears_from_a_long_run_every_log_interval():
    stream = FakeStream(False)
    run(Progress(7, "work", stream=stream, width=7, log_interval=0.0))
    lines = stream.text.splitlines()
    # one line per unfinished update (log_interval 0), then the closing one
    assert len(lines) == 7 and lines[0].startswith("[#------] 1/7 work") and lines[-1].startswith("[#######] 7/7")
    assert "\r" not in stream.text


def test_counting_callers_and_closing_twice():
    stream = FakeStream(False)
    bar = Progress(5, "bench", stream=stream)
    bar.advance_to(3, "case a")
    bar.advance_to(9, "case b")  # clamped to the total
    bar.close("done")
    bar.close()
    assert stream.text.count("\n") == 1 and "5/5 bench" in stream.text and stream.text.rstrip().endswith("done")


def test_disabled_writes_nothing():
    stream = FakeStream(True)
    run(Progress(3, "quiet", stream=stream, enabled=False), 3)
    assert stream.text == ""


def test_bad_arguments(monkeypatch):
    with pytest.raises(ValueError, match="total must be a positive int"):
        Progress(0, "x")
    with pytest.raises(TypeError, match="label must be a str"):
        Progress(3, 3)
    with pytest.raises(ValueError, match="min_interval must be a number >= 0"):
        Progress(3, "x", min_interval=-1)
    with pytest.raises(ValueError, match="log_interval must be a number >= 0"):
        Progress(3, "x", log_interval="1")
    with pytest.raises(TypeError, match="use_tqdm must be None or a bool"):
        Progress(3, "x", use_tqdm="yes")
    monkeypatch.setattr(progress_module, "_tqdm", lambda: None)
    with pytest.raises(ImportError, match="use_tqdm=True needs tqdm"):
        Progress(3, "x", stream=FakeStream(True), use_tqdm=True)
