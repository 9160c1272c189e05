"""Progress bars: redrawn in place on a terminal, whole and few lines in a log (kfp, pod logs, CI)."""

import io

from spade.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_log_each_update_is_a_whole_line_and_they_are_few():
    log = io.StringIO()
    for _ in progress_bar(range(5000), desc="train", unit="it", file=log):
        pass
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert text.endswith("\n") and all(line.strip() for line in lines)
    assert lines[0].startswith("train:") and "0/5000" in lines[0]
    assert "5000/5000" in lines[-1]
    assert len(lines) <= 3  # the start, perhaps one redraw, the end: not one per update (15 s apart at most)


def test_a_log_line_comes_when_the_interval_has_passed():
    log = io.StringIO()
    with progress_bar(total=3, desc="segmenter", file=log, mininterval=0, miniters=1) as bar:
        for _ in range(3):
            bar.update()
    lines = log.getvalue().splitlines()
    assert [line.split("|")[0].strip() for line in lines][-1].endswith("100%")
    assert sum("/3 " in line for line in lines) >= 4  # 0/3, 1/3, 2/3, 3/3: a line for each update


def test_on_a_terminal_the_bar_redraws_in_place():
    tty = Terminal()
    with progress_bar(total=3, desc="train", file=tty, mininterval=0, miniters=1) as bar:
        for _ in range(3):
            bar.update()
    assert tty.getvalue().count("\r") >= 4


def test_disabled_writes_nothing():
    log = io.StringIO()
    for _ in progress_bar(range(10), file=log, disable=True):
        pass
    assert log.getvalue() == ""
