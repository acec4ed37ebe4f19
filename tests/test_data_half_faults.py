"""Faults of the data half (issue 24): each bad input gets a clear error or a recorded status, and the
good data beside it survives. A YAML alias bomb in params, an archive whose name gives no folder of its
own, a face lying on its side, and a Dask scheduler address nothing answers at."""

from __future__ import annotations

import socket
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

import flows.ingest
from flows.preprocess import DASK_CONNECT_TIMEOUT_S, require_scheduler, run_flow, task_runner
from preprocessing import denylist, filters
from preprocessing.ingest import manifest
from preprocessing.ingest.archive import UnsafeArchiveError, extraction_folder
from preprocessing.media import write_mp4
from preprocessing.process import process_clip
from preprocessing.sample.portraits import prepare_portrait
from tests.conftest import REPO
from vasa.core.config import MAX_PARAMS_BYTES, MAX_PARAMS_NODES, ConfigError, load_params
from vasa.core.errors import InputError

# --- 1. params YAML is bounded --------------------------------------------------------------------


def _params_with(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text() + extra)
    return path


def test_yaml_alias_bomb_is_refused_at_once_naming_the_file(tmp_path):
    # Nine levels of nine aliases: 9^9 (387 million) strings once expanded, 600 bytes of text.
    levels = ["l0: &l0 [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"l{n}: &l{n} [" + ", ".join([f"*l{n - 1}"] * 9) + "]" for n in range(1, 10)]
    path = _params_with(tmp_path, "bomb:\n" + "".join(f"  {line}\n" for line in levels))
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert time.monotonic() - start < 5
    assert str(err.value) == (
        f"{path}: over {MAX_PARAMS_NODES} YAML nodes once aliases are expanded (an alias bomb?): refused"
    )


def test_recursive_alias_is_refused(tmp_path):
    path = _params_with(tmp_path, "loop: &loop [*loop]\n")
    with pytest.raises(ConfigError, match="once aliases are expanded"):
        load_params(path)


def test_oversized_params_file_is_refused_unread(tmp_path):
    path = _params_with(tmp_path, "#" * MAX_PARAMS_BYTES + "\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(err.value) == f"{path}: params file larger than {MAX_PARAMS_BYTES} bytes: refused"


def test_params_with_a_few_anchors_still_load(tmp_path):
    """A dumper writes anchors for a value shared twice (&id001 / *id001): still a valid params file."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["judges"]["capp"]["train"] = data["judges"]["sync"]["train"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    assert "*id001" in path.read_text()
    params = load_params(path)
    assert params.judges.capp.train == params.judges.sync.train


# --- 2. an archive's extraction folder is its own ----------------------------------------------------


@pytest.mark.parametrize("name", ["...zip", "..zip", ".zip"])
def test_archive_names_without_a_folder_of_their_own_are_refused(tmp_path, name):
    with pytest.raises(UnsafeArchiveError, match="not a folder of its own"):
        extraction_folder(tmp_path, name)


@pytest.mark.parametrize(("name", "folder"), [("vox2_dev_mp4.zip", "vox2_dev_mp4"), ("a.b.zip", "a.b")])
def test_archive_folder_is_the_name_without_zip(tmp_path, name, folder):
    assert extraction_folder(tmp_path, name) == tmp_path / folder


def test_dot_dot_archive_is_a_row_and_the_other_archive_lands(params, tmp_path, monkeypatch):
    """`...zip` once extracted into the output root, where no scan looks: its clips vanished without a row."""
    for name in ("download_archive", "extract_archive"):  # the task bodies, without a Prefect server
        monkeypatch.setattr(flows.ingest, name, getattr(flows.ingest, name).fn)
    release = tmp_path / "release"
    release.mkdir()
    with zipfile.ZipFile(release / "...zip", "w") as handle:
        handle.writestr("mp4/id00001/abcdefghijk/00001.mp4", b"clip of the dot-dot archive")
    with zipfile.ZipFile(release / "vox2_test_mp4.zip", "w") as handle:
        handle.writestr("mp4/id06811/AbCdEfGhIjK/00216.mp4", b"good clip")

    def archive(name: str) -> dict:
        return {"name": name, "md5": None, "parts": [{"url": str(release / name), "md5": None, "size": None}]}

    vox = params.ingest.voxceleb2.replace(archives=[archive("...zip"), archive("vox2_test_mp4.zip")], retries=0)
    cfg = params.ingest.replace(sources=("voxceleb2",), voxceleb2=vox)
    out = tmp_path / "out"
    rows, _ = flows.ingest.ingest_voxceleb(cfg, out, tmp_path / "dl", [], denylist.Denylist(), {}, {})
    by_id = {row["clip_id"]: row for row in rows}
    refused = by_id["voxceleb2-archive:...zip"]
    assert (refused["status"], refused["error"]) == (
        manifest.BAD_ARCHIVE,
        "UnsafeArchiveError: archive name '...zip' gives extraction folder '..', not a folder of its own: rename it",
    )
    good = by_id["voxceleb2:id06811/AbCdEfGhIjK/00216"]
    assert good["status"] == manifest.OK and Path(good["media_path"]).read_bytes() == b"good clip"
    assert not (out / "mp4").exists() and not (tmp_path / "mp4").exists()  # nothing extracted above its folder
    assert not (tmp_path / "dl" / "...zip").exists()  # refused before downloading


# --- 3. a face lying on its side is filtered -----------------------------------------------------------


def _segment(yaw: float, pitch: float, roll: np.ndarray, cfg) -> list[tuple[str, str]]:
    n = len(roll)
    return filters.segment_problems(n, 25, 100.0, np.full(n, yaw), np.full(n, pitch), roll, None, 0.0, 1.0, cfg)


def test_roll_filter_rejects_sideways_faces_with_the_measured_value(params):
    cfg = params.preprocess.filters
    assert _segment(3.0, 5.0, np.full(50, -92.0), cfg) == [
        (filters.EXTREME_POSE, "median |yaw|, |pitch|, |roll| 3.0, 5.0, 92.0 (max 60.0, 45.0, 45.0)")
    ]
    # Upside down: roll flickers between +179 and -179, whose signed median is 0.
    assert _segment(0.0, 0.0, np.tile([179.0, -179.0], 25), cfg)[0][0] == filters.EXTREME_POSE
    # The sample corpus's head motion (portraits at roll +2.9 / -2.0 degrees, peak motion 7 degrees) passes.
    assert _segment(5.0, 8.0, 2.9 + 7.0 * np.sin(np.linspace(0, 6, 100)), cfg) == []
    assert _segment(5.0, 8.0, np.full(50, cfg.max_abs_roll_deg), cfg) == []  # the limit itself is kept


def _portrait_clip(path: Path, angle: float) -> Path:
    """30 frames of the astronaut portrait rotated by `angle` degrees in the image, with a tone."""
    image = prepare_portrait("skimage_astronaut", 256).image
    rotation = cv2.getRotationMatrix2D((128, 128), angle, 1.0)
    frame = cv2.warpAffine(image, rotation, (256, 256), borderMode=cv2.BORDER_REPLICATE)
    sound = (0.1 * np.sin(np.arange(30 * 640) * 0.05)).astype(np.float32)
    write_mp4(path, np.repeat(frame[None], 30, axis=0), 25, sound, 16000)
    return path


@pytest.mark.slow  # FaceMesh over two 30-frame clips: ~6 s on 2 loaded cores
def test_a_face_rolled_92_degrees_never_reaches_a_shard_an_upright_one_does(params, tmp_path):
    outcomes = {}
    for angle in (92, 0):  # OpenCV's positive angle turns the image counter-clockwise: roll ~ -90
        row = {"clip_id": f"local:r{angle}", "key": f"{angle:032x}", "av_offset": None}
        row["media_path"] = str(_portrait_clip(tmp_path / f"r{angle}.mp4", angle))
        outcomes[angle] = process_clip(row, params.preprocess)
    sideways, upright = outcomes[92], outcomes[0]
    assert not sideways.samples and [f["reason"] for f in sideways.failures] == [filters.EXTREME_POSE]
    roll = float(sideways.failures[0]["detail"].split("|roll| ")[1].split(", ")[2].split(" ")[0])
    assert roll > 80
    assert len(upright.samples) == 1 and not upright.failures


# --- 4. an unreachable Dask scheduler is one clear line, before any work -------------------------------


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_dask_address_is_one_line_naming_it_before_any_work(params, tmp_path):
    address = f"tcp://127.0.0.1:{_closed_port()}"
    cfg = params.preprocess.replace(runner=params.preprocess.runner.replace(kind="dask", dask_address=address))
    start = time.monotonic()
    with pytest.raises(InputError) as err:
        run_flow(cfg, tmp_path / "manifest.parquet", tmp_path / "shards", tmp_path / "cache")
    assert time.monotonic() - start < DASK_CONNECT_TIMEOUT_S
    message = str(err.value)
    assert message == (
        f"preprocess.runner.dask_address {address!r}: no Dask scheduler reachable at 127.0.0.1:"
        f"{address.rsplit(':', 1)[1]} within 5 s (Connection refused); start it, or set "
        "preprocess.runner.dask_address: null for a local cluster"
    )
    assert "\n" not in message
    assert not (tmp_path / "shards").exists() and not (tmp_path / "cache").exists()


def test_bad_dask_address_and_listening_scheduler(params):
    with pytest.raises(InputError, match="not a Dask scheduler address"):
        require_scheduler("tcp://127.0.0.1:notaport")
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        host, port = listening.getsockname()
        runner = params.preprocess.runner.replace(kind="dask", dask_address=f"tcp://{host}:{port}")
        assert type(task_runner(runner)).__name__ == "DaskTaskRunner"
