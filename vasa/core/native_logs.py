"""Native log lines on file descriptor 2 (MediaPipe, TFLite, absl) routed through Python `logging`.

MediaPipe's C++ (absl logging, never initialised, so `GLOG_minloglevel` and friends do nothing) and
TFLite (`fprintf(stderr, ...)`) write straight to fd 2, under Python's `sys.stderr` and out of reach
of `logging`. `captured()` points fd 2 at a temporary file for the length of a block, then reads the
lines back and hands each to the logger `vasa.core.native_logs`: lines matching NOISE, messages known to
be benign, at DEBUG; every other line at the level its prefix names (absl's I/W/E/F, TFLite's
INFO:/WARNING:/ERROR:), or WARNING without a prefix, so a real native error still reaches the console.

fd 2 is process-wide, so concurrent blocks share one redirection: the first thread to enter points
fd 2 at the capture file, later ones join it, and the last to leave restores fd 2 and re-emits
everything captured (a lock guards that switch and the re-emission: no block waits for another's
work, only for a switch or a re-emission in progress). While any
block is open, whatever any thread writes to fd 2, Python tracebacks and log records included, is
held back and re-emitted afterwards like an unknown native line: keep blocks short (building a
graph, its first frame), not whole loops. A native abort inside a block cannot re-emit anything; its last words stay
in the capture file, `native-stderr-*.log` in the temporary directory, which is removed only on a
normal exit.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

logger = logging.getLogger(__name__)

# Messages known to be benign, matched with re.search against each line. Every entry says why.
NOISE = (
    # absl's one-time notice that logging was never initialised (MediaPipe never calls InitializeLog).
    re.compile(r"All log messages before absl::InitializeLog\(\) is called are written to STDERR"),
    # TFLite, each time a graph loads a model on CPU: the XNNPACK delegate is the expected CPU path.
    re.compile(r"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.$"),
    # Each inference calculator at every graph run (construction and reset): FaceMesh's models have
    # one signature, so there are no feedback tensors to support.
    re.compile(r"inference_feedback_manager\.cc:\d+\] Feedback manager requires a model with a single signature"),
    # Once per process, at the first face projected: FaceMesh's landmark ROIs are square, the case
    # this calculator supports without IMAGE_DIMENSIONS.
    re.compile(r"landmark_projection_calculator\.cc:\d+\] Using NORM_RECT without IMAGE_DIMENSIONS is only supported"),
    # Information lines of the GL context on machines with a GPU build (version, renderer, EGL).
    re.compile(r"^I\d{4} [^\]]* gl_context(_egl)?\.cc:\d+\] "),
)
# absl/glog prefix: severity letter, MMDD, time, thread id, file:line]
_ABSL = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ \S+:\d+\] ")
_ABSL_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
_TFLITE = re.compile(r"^(INFO|WARNING|ERROR): ")

_lock = threading.Lock()
_open = 0  # blocks open in this process (all threads)
_saved_fd: int | None = None  # the real fd 2 while blocks are open
_capture_fd: int | None = None
_capture_path: str | None = None


def level_of(line: str) -> int:
    """The `logging` level to re-emit one captured line at: DEBUG for NOISE, else its own severity."""
    if any(pattern.search(line) for pattern in NOISE):
        return logging.DEBUG
    if match := _ABSL.match(line):
        return _ABSL_LEVELS[match.group(1)]
    if match := _TFLITE.match(line):
        return logging.getLevelNamesMapping()[match.group(1)]
    return logging.WARNING


def emit(text: str) -> None:
    """Log each non-empty line of `text` at `level_of(line)`."""
    for line in text.splitlines():
        if line.strip():
            logger.log(level_of(line), "%s", line)


@contextmanager
def captured() -> Iterator[None]:
    """Catch what native code writes to fd 2 inside the block and re-emit it through `logging`.

    Blocks may overlap across threads and nest; the lines come out when the last open block ends.
    Without a usable fd 2 (closed by a daemon) or a writable temporary directory, the block runs
    uncaptured.
    """
    if not _enter():
        yield
        return
    try:
        yield
    finally:
        _leave()


def _enter() -> bool:
    """Join the open redirection, or open one: fd 2 onto a fresh capture file. False when there is
    nothing to redirect (fd 2 closed) or nowhere to capture to."""
    global _open, _saved_fd, _capture_fd, _capture_path
    with _lock:
        if _open == 0:
            _flush_python_stderr()
            try:
                saved = os.dup(2)
            except OSError:
                return False
            try:
                fd, path = tempfile.mkstemp(prefix="native-stderr-", suffix=".log")
            except OSError:  # no writable temporary directory: leave fd 2 alone
                os.close(saved)
                return False
            os.dup2(fd, 2)
            _saved_fd, _capture_fd, _capture_path = saved, fd, path
        _open += 1
        return True


def _leave() -> None:
    """Leave the redirection; the last block out restores fd 2 and re-emits what was captured.

    The re-emission happens under the lock, so no other thread can point fd 2 at a new capture file
    while these records are written: they would be caught and re-emitted a second time, wrapped.
    """
    global _open, _saved_fd, _capture_fd, _capture_path
    with _lock:
        _open -= 1
        if _open > 0:
            return
        # _enter() set all three when it opened the redirection that this last block closes.
        assert _saved_fd is not None and _capture_fd is not None and _capture_path is not None
        _flush_python_stderr()
        os.dup2(_saved_fd, 2)
        os.close(_saved_fd)
        with open(_capture_fd, "rb") as capture:  # closes the capture fd
            capture.seek(0)
            data = capture.read()
        os.unlink(_capture_path)
        _saved_fd = _capture_fd = _capture_path = None
        emit(data.decode("utf-8", errors="replace"))


def _flush_python_stderr() -> None:
    """Write out what Python has buffered for fd 2, so it lands on the side of the switch it was written."""
    if sys.stderr is not None:
        with suppress(OSError, ValueError):  # a closed or detached stream has nothing to write
            sys.stderr.flush()
