"""Progress bars in a log file: whole lines, none for a short step, no carriage-return frames."""
from __future__ import annotations

import io

from csr import progress


def test_a_short_bar_in_a_log_file_prints_nothing(monkeypatch):
    monkeypatch.delenv("CSR_PROGRESS", raising=False)
    log = io.StringIO()
    for _ in progress.progress_bar(range(1000), desc="step", file=log):
        pass
    assert log.getvalue() == ""


def test_a_long_bar_in_a_log_file_prints_whole_lines_and_its_final_state(monkeypatch):
    monkeypatch.delenv("CSR_PROGRESS", raising=False)
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)  # every update is "long"
    log = io.StringIO()
    with progress.progress_bar(total=5, desc="epoch 1/1", file=log) as b:
        for _ in range(5):
            b.update(1)
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines and all(line.startswith("epoch 1/1") for line in lines)
    assert "5/5" in lines[-1]


def test_a_terminal_gets_tqdm_frames(monkeypatch):
    monkeypatch.setenv("CSR_PROGRESS", "tty")
    log = io.StringIO()
    for _ in progress.progress_bar(range(3), desc="x", file=log):
        pass
    assert "\r" in log.getvalue()
