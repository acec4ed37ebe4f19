"""Monitoring on the main process: DVCLive metrics (declared as DVC metrics/plots), PNG grids and a
tqdm progress bar with ETA. Other ranks get a monitor that does nothing.

A resumed run continues each DVCLive series from the step of the state it resumed: DVCLive's own
`resume` only appends, so the rows a killed run logged after its last state are dropped first and
logged once more as the run gets there again (`truncate_series`): no step appears twice."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vasa.core.files import atomic_path

SERIES = Path("plots") / "metrics"  # DVCLive's per-metric TSV files (`step<TAB>value` rows), under live_dir


def _row_step(line: str, column: int) -> int | None:
    fields = line.rstrip("\r\n").split("\t")
    try:
        return int(fields[column])
    except (IndexError, ValueError):  # a row cut short by a kill mid-write
        return None


def truncate_series(live_dir: Path, last_step: int) -> None:
    """Keep only the rows up to `last_step` in every DVCLive series under `live_dir`, rewriting a file
    (atomically) only when it had later rows or a broken one."""
    for path in sorted((live_dir / SERIES).rglob("*.tsv")):
        with path.open(encoding="utf-8", newline="") as stream:  # newline="": rows keep their own endings
            lines = stream.readlines()
        header = lines[0].rstrip("\r\n").split("\t") if lines else []
        if "step" not in header:
            continue
        column = header.index("step")
        kept = [lines[0]]
        for line in lines[1:]:
            step = _row_step(line, column)
            if step is not None and step <= last_step:
                kept.append(line)
        if len(kept) != len(lines):
            with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as stream:
                stream.writelines(kept)


class Monitor:
    """Rank-0 logging. `live_dir` holds DVCLive's metrics.json and plots/metrics/*.tsv; grids go to
    `images_dir/step_NNNNNNN.png`."""

    def __init__(self, live_dir: Path, images_dir: Path, total_steps: int, start_step: int, enabled: bool, bar: bool):
        self.enabled = enabled
        self.images_dir = images_dir
        self.live = None
        self.bar = None
        if not enabled:
            return
        from dvclive import Live

        if start_step > 0:
            truncate_series(live_dir, start_step)
        # DVC itself tracks the stage; DVCLive must not write a dvc.yaml or start an experiment.
        self.live = Live(str(live_dir), resume=start_step > 0, save_dvc_exp=False, dvcyaml=None)
        images_dir.mkdir(parents=True, exist_ok=True)
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not bar)
        self._window_start = time.perf_counter()
        self._window_images = 0

    def step(self, images: int) -> None:
        """One optimiser step done, having consumed `images` training samples over all processes."""
        if not self.enabled:
            return
        self._window_images += images
        assert self.bar is not None  # set in __init__ when enabled
        self.bar.update(1)

    def log(self, step: int, scalars: dict[str, float], memory_bytes: int | None) -> None:
        """Write one metrics row (every loss term, LR, images/s, GPU memory when there is one)."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self._window_start
        row = dict(scalars)
        if elapsed > 0 and self._window_images:
            row["images_per_s"] = self._window_images / elapsed
        if memory_bytes is not None:
            row["gpu_mem_gib"] = memory_bytes / 2**30
        assert self.live is not None and self.bar is not None  # set in __init__ when enabled
        self.live.step = step
        for name, value in sorted(row.items()):
            self.live.log_metric(name, float(value))
        self.live.next_step()
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in sorted(scalars.items()) if k.startswith("loss")}, refresh=False)
        self._window_start, self._window_images = time.perf_counter(), 0

    def image(self, step: int, grid: np.ndarray) -> Path | None:
        """Save a (H, W, 3) uint8 grid as PNG."""
        if not self.enabled:
            return None
        grid = np.asarray(grid)
        if grid.dtype != np.uint8 or grid.ndim != 3 or grid.shape[2] != 3:
            raise ValueError(f"image grid must be (H, W, 3) uint8, got {grid.shape} {grid.dtype}")
        path = self.images_dir / f"step_{step:07d}.png"
        Image.fromarray(grid).save(path)
        return path

    def summary(self, values: dict[str, float]) -> None:
        """Final figures (e.g. held-out PSNR) into DVCLive's metrics.json, without a plot."""
        if not self.enabled:
            return
        assert self.live is not None  # set in __init__ when enabled
        for name, value in sorted(values.items()):
            self.live.log_metric(name, float(value), plot=False)

    def close(self) -> None:
        if not self.enabled:
            return
        assert self.live is not None and self.bar is not None  # set in __init__ when enabled
        self.bar.close()
        self.live.end()
