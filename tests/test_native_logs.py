"""vasa.core.native_logs: native lines on fd 2 are caught, known noise goes to DEBUG, the rest is re-emitted.

fd 2 is process-wide, so each test runs its writer in a child process and reads the child's real
stderr: that is what a console would show.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vasa.core import native_logs

REPO = Path(__file__).resolve().parents[1]

# One instance of each line MediaPipe 0.10 printed on a `vasa preprocess` run (docs/BENCHMARKS.md).
NOISE_LINES = (
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "W0000 00:00:1795345500.265990   13142 inference_feedback_manager.cc:114] Feedback manager requires a "
    "model with a single signature inference. Disabling support for feedback tensors.",
    "W0000 00:00:1795345500.401276   13141 landmark_projection_calculator.cc:186] Using NORM_RECT without "
    "IMAGE_DIMENSIONS is only supported for the square ROI. Provide IMAGE_DIMENSIONS or use PROJECTION_MATRIX.",
    "I0000 00:00:1795345500.100000   13140 gl_context.cc:369] GL version: 3.2 (OpenGL ES 3.2 NVIDIA), renderer: H100",
)
# Substrings that identify the noise in a child's stderr whatever the timestamps.
NOISE_MARKS = (
    "XNNPACK delegate",
    "absl::InitializeLog",
    "inference_feedback_manager",
    "landmark_projection_calculator",
    "gl_context",
)
UNKNOWN_ERROR = "E0000 00:00:1795345500.5   13142 tflite_model_loader.cc:42] Failed to load model: file not found"


def _run_child(code: str, tmp_dir: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter from the repository root (temporary files in `tmp_dir`). Its
    logging sends INFO and up to stderr (as the CLI does) and everything, DEBUG included, to stdout."""
    prelude = textwrap.dedent(
        """
        import logging, os, sys
        logging.getLogger().setLevel(logging.DEBUG)
        for stream, level in ((sys.stderr, logging.INFO), (sys.stdout, logging.DEBUG)):
            handler = logging.StreamHandler(stream)
            handler.setLevel(level)
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            logging.getLogger().addHandler(handler)
        """
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | ({"TMPDIR": str(tmp_dir)} if tmp_dir else {}),
    )


@pytest.mark.parametrize("line", NOISE_LINES)
def test_known_noise_is_debug(line):
    assert native_logs.level_of(line) == logging.DEBUG


@pytest.mark.parametrize(
    ("line", "level"),
    [
        (UNKNOWN_ERROR, logging.ERROR),
        ("F0000 00:00:1795345500.5   13142 calculator_graph.cc:9] Check failed: graph", logging.CRITICAL),
        ("W0000 00:00:1795345500.5   13142 inference_calculator.cc:7] something new", logging.WARNING),
        ("I0000 00:00:1795345500.5   13142 calculator_graph.cc:7] graph started", logging.INFO),
        ("ERROR: failed to allocate tensors", logging.ERROR),
        ("Segmentation fault somewhere", logging.WARNING),  # no prefix: never below WARNING
        # A known message under an unexpected prefix is not swallowed by a loose pattern.
        ("E0000 00:00:1795345500.5   1 other.cc:1] XNNPACK delegate failed", logging.ERROR),
    ],
)
def test_other_lines_keep_their_severity(line, level):
    assert native_logs.level_of(line) == level


def test_noise_is_caught_and_unknown_lines_are_reemitted(tmp_path):
    lines = "".join(f"{line}\n" for line in (*NOISE_LINES, UNKNOWN_ERROR))
    result = _run_child(
        f"""
        from vasa.core import native_logs
        before = os.fstat(2)
        with native_logs.captured():
            os.write(2, {lines.encode()!r})  # as native code does: straight to the descriptor
        after = os.fstat(2)
        assert (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino), "fd 2 not restored"
        os.write(2, b"plain write after the block\\n")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    stderr = result.stderr.splitlines()
    assert not [line for line in stderr if any(mark in line for mark in NOISE_MARKS)], result.stderr
    # The unknown error comes back once, through logging at its own level, not raw.
    assert stderr.count(f"ERROR vasa.core.native_logs: {UNKNOWN_ERROR}") == 1, result.stderr
    assert UNKNOWN_ERROR not in stderr
    assert not list(tmp_path.iterdir())  # the capture file is removed
    assert stderr[-1] == "plain write after the block"  # fd 2 reaches the console again
    # The noise is not lost either: it is on the DEBUG stream.
    for line in NOISE_LINES:
        assert f"DEBUG vasa.core.native_logs: {line}" in result.stdout.splitlines()


def test_overlapping_blocks_across_threads_lose_and_duplicate_nothing(tmp_path):
    result = _run_child(
        """
        import threading
        from vasa.core import native_logs
        start = threading.Barrier(8)
        def work(n):
            start.wait()
            for i in range(20):
                with native_logs.captured():
                    with native_logs.captured():  # nested blocks join the open capture
                        os.write(2, f"E0000 00:00:1.0 {n} t.cc:1] thread {n} line {i}\\n".encode())
        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        os.write(2, b"console again\\n")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    stderr = result.stderr.splitlines()
    expected = sorted(
        f"ERROR vasa.core.native_logs: E0000 00:00:1.0 {n} t.cc:1] thread {n} line {i}"
        for n in range(8)
        for i in range(20)
    )
    assert sorted(line for line in stderr if line.startswith("ERROR")) == expected
    # No re-emitted record was caught by a later block and re-emitted again, wrapped in a second prefix.
    assert sorted(line for line in stderr if " t.cc:1] thread " in line) == expected, result.stderr
    assert stderr[-1] == "console again"
    assert not list(tmp_path.iterdir())  # every capture file removed


def test_closed_fd2_runs_the_block_uncaptured():
    result = _run_child(
        """
        from vasa.core import native_logs
        os.close(2)
        with native_logs.captured():
            ran = True
        print("ran", ran)
        """
    )
    assert result.returncode == 0, result.stdout
    assert "ran True" in result.stdout


def test_facemesh_tracker_leaves_no_native_noise_on_stderr():
    """A real FaceMesh graph, built, reset and run in a fresh process (as a spawned worker is), on the sample
    corpus's astronaut portrait (bundled with scikit-image: no fixture needed). Skipped only without mediapipe:
    a graph that cannot be built or run is a failure."""
    if importlib.util.find_spec("mediapipe") is None:  # not importorskip: a broken install must fail, not skip
        pytest.skip("mediapipe is not installed")
    result = _run_child(
        """
        import mediapipe  # importing prints nothing; the graph does
        import numpy as np
        from preprocessing import face
        from preprocessing.sample.portraits import prepare_portrait
        from vasa.core.config import load_params
        frames = np.repeat(prepare_portrait("skimage_astronaut", 256).image[None], 6, axis=0)
        cfg = load_params("params.yaml").preprocess.face
        tracker = face.get_tracker(cfg)
        faces = [int(tracker.track(frames).faces.sum()) for _ in range(2)]  # two clips: two resets
        print("faces", faces)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "faces [6, 6]" in result.stdout, result.stdout
    noise = [line for line in result.stderr.splitlines() if any(mark in line for mark in NOISE_MARKS)]
    assert not noise, "\n".join(noise)
    # The graph did log (so the test can fail): construction, both resets and the first face.
    debug = [line for line in result.stdout.splitlines() if line.startswith("DEBUG vasa.core.native_logs:")]
    assert sum("inference_feedback_manager" in line for line in debug) >= 6, debug
    assert sum("landmark_projection_calculator" in line for line in debug) == 1, debug
