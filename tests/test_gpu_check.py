"""benchmarks/gpu_check.py through its main(argv) on the CPU in --quick mode (`tiny` presets at 64²): every part
is in the JSON, measured with finite positive figures or with its error recorded, and the Markdown table has
one row per measurement."""

from __future__ import annotations

import importlib
import json
import math

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # ~1 min on 2 shared cores: three child processes (plain, ZeRO-2, ZeRO-3)

# Figures each measured part must carry (finite and positive); MFU needs a known GPU and is absent on a CPU.
FIGURES = {
    "stage1_plain": ("images_per_s", "step_s", "tflop_per_image", "achieved_tflops", "peak_memory_gib"),
    "stage1_zero2": ("images_per_s", "step_s", "tflop_per_image", "achieved_tflops", "peak_memory_gib"),
    "stage1_zero3": ("images_per_s", "step_s", "tflop_per_image", "achieved_tflops", "peak_memory_gib"),
    "stage2_step": ("windows_per_s", "step_s", "tflop_per_window", "achieved_tflops"),
    "stage2_sampling": ("x_realtime", "s_per_s_audio", "wall_s"),
    "generation_offline": ("fps_pasted", "fps_crop_only"),
    "generation_streaming": ("first_frame_s", "audio_wait_s", "compute_s"),
}
# What a CPU must measure; ZeRO-3 may record an error instead (a DeepSpeed failure is a finding, not a crash).
MUST_MEASURE = set(FIGURES) - {"stage1_zero3"}


def test_quick_cpu_run_writes_every_part(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # the script imports its sibling benchmarks
    gpu_check = importlib.import_module("gpu_check")
    out_json, out_md = tmp_path / "check.json", tmp_path / "check.md"
    argv = ["--device", "cpu", "--quick", "--threads", "1", "--params", str(REPO / "params.yaml"),
            "--json", str(out_json), "--markdown", str(out_md)]  # fmt: skip
    gpu_check.main(argv)

    report = json.loads(out_json.read_text())
    machine = report["machine"]
    assert machine["device"] == "cpu" and machine["cpu_count"] >= 1 and machine["torch"]
    assert machine["peak_bf16_tflops"] is None
    parts = report["parts"]
    assert set(parts) == set(FIGURES)
    for name, keys in FIGURES.items():
        part = parts[name]
        if name not in MUST_MEASURE and part["status"] == "error":
            assert part["error"], name
            continue
        assert part["status"] == "ok", (name, part)
        for key in keys:
            assert isinstance(part[key], int | float) and math.isfinite(part[key]) and part[key] > 0, (name, key)
        assert "mfu" not in part
    assert parts["stage1_plain"]["batch"] == 2 and parts["stage1_plain"]["precision"] == "fp32"
    # The paper's stage-2 window, and a first frame that waits for one whole window of audio.
    assert (parts["stage2_step"]["window"], parts["stage2_step"]["context"]) == (100, 25)
    streaming = parts["generation_streaming"]
    assert streaming["audio_wait_s"] >= 0.9 * streaming["window"] / 25

    rows = [line for line in out_md.read_text().splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| measurement |")
    assert sorted(row.split("|")[1].strip() for row in rows[1:]) == sorted(FIGURES)
