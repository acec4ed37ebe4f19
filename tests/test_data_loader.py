"""The stage-1 loader (vasa/loaders/pairs.py) on synthetic shards written here with the schema's members.

Every frame encodes where it came from in flat colours that survive H.264: red = 12 x frame index,
green = 30 x clip number, blue = 60 x speaker number; pose.npy column 0 holds the frame index. So
a batch can be checked for same-clip pairs, frame gaps, held-out frames, pose alignment and
cross-identity `other` frames."""

from __future__ import annotations

import dataclasses
import io
import json
import random

import numpy as np
import pytest
import torch

from preprocessing import schema
from preprocessing.media import write_mp4
from preprocessing.shards import Sample, write_shard
from vasa.core.config import LatentDataConfig
from vasa.core.errors import InputError
from vasa.loaders.pairs import (
    Frame,
    PairStream,
    draw_rest_pair,
    heldout_batch,
    pair_batches,
    rest_frames,
    train_frames,
    worker_frames,
)
from vasa.loaders.shards import decode_some, open_shards, read_samples, worker_shards

FRAMES, SIDE, SIZE = 20, 32, 16


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _sample(tmp, clip: int, speaker: int, split: str) -> Sample:
    frames = np.zeros((FRAMES, SIDE, SIDE, 3), np.uint8)
    frames[..., 0] = (12 * np.arange(FRAMES))[:, None, None]
    frames[..., 1], frames[..., 2] = 30 * clip, 60 * speaker
    path = tmp / f"clip{clip}.mp4"
    write_mp4(path, frames, fps=25, crf=10, preset="ultrafast")
    pose = np.zeros((FRAMES, len(schema.POSE_COLUMNS)), np.float32)
    pose[:, 0] = np.arange(FRAMES)
    key = f"{clip:04d}abcd_0"
    meta = {"key": key, "split": split, "provenance": {"speaker_id": f"spk{speaker}", "split": split}}
    expression = np.zeros((FRAMES, len(schema.EXPRESSION_COLUMNS)), np.float32)
    expression[:, 0] = 0.01 * np.arange(FRAMES)  # mouth_open
    landmarks = np.full((FRAMES, schema.N_LANDMARKS, 3), SIDE / 2, np.float16)
    landmarks[:, 61, 0], landmarks[:, 291, 0] = SIDE * 0.35, SIDE * 0.65  # lip corners: a mouth mid-low
    landmarks[:, 0, 1], landmarks[:, 17, 1] = SIDE * 0.7, SIDE * 0.8
    members = {
        schema.MP4: path.read_bytes(),
        schema.POSE: _npy(pose),
        schema.EXPRESSION: _npy(expression),
        schema.LANDMARKS: _npy(landmarks),
        schema.JSON: json.dumps(meta).encode(),
    }
    return Sample(key, members, frames=FRAMES, seconds=FRAMES / 25)


def write_synthetic_shards(root, layout: dict[str, list[list[tuple[int, int]]]], dataset: dict | None = None):
    """layout: split -> shards -> (clip, speaker) samples. Writes the tars and index.json."""
    root.mkdir(parents=True, exist_ok=True)
    index = {"splits": {}}
    for split, shards in layout.items():
        entries = []
        for n, members in enumerate(shards):
            name = f"{split}-{n}-0000.tar"
            write_shard(root / name, [_sample(root, clip, speaker, split) for clip, speaker in members])
            entries.append({"shard": name, "samples": len(members), "frames": FRAMES * len(members)})
        index["splits"][split] = {"shards": entries}
    if dataset is not None:
        index["dataset"] = dataset
    (root / "index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    train = [[(0, 0), (1, 1)], [(2, 0), (3, 1)], [(4, 2), (5, 0)]]
    layout = {"train": train, "test": [[(6, 3), (7, 3)]]}
    return write_synthetic_shards(root, layout, {"schema_version": schema.SCHEMA_VERSION, "crop_size": SIDE})


def data_config(**changes) -> LatentDataConfig:
    values = {"shuffle_buffer": 4, "pairs_per_clip": 3, "min_frame_gap": 2, "holdout_fraction": 0.25}
    return LatentDataConfig.from_data(values | {"eval_pairs": 8, "workers": 0} | changes)


def decode(image: torch.Tensor) -> tuple[int, int, int]:
    """(frame index, clip, speaker) from a (3, S, S) frame in [-1, 1]."""
    rgb = ((image.mean(dim=(1, 2)) + 1) * 127.5).tolist()
    return round(rgb[0] / 12), round(rgb[1] / 30), round(rgb[2] / 60)


def take(source, n: int, epoch: int = 0, rank: int = 0, world: int = 1) -> list[dict]:
    stream = source(epoch, rank, world)
    return [next(stream) for _ in range(n)]


def test_batches_hold_same_clip_pairs_and_a_cross_identity_frame(shards):
    shard_set = open_shards(shards)
    assert shard_set.speakers == ("spk0", "spk1", "spk2") and shard_set.crop_size == SIDE
    cfg = data_config()
    batch = take(pair_batches(shard_set, SIZE, cfg, batch_size=6, seed=0), 1)[0]
    assert batch["source"].shape == (6, 3, SIZE, SIZE) and batch["source"].dtype == torch.float32
    assert batch["source_pose"].shape == (6, 7) and batch["speaker"].dtype == torch.int64
    for key in ("source", "driver", "other"):
        assert batch[key].min() >= -1 and batch[key].max() <= 1
    limit = train_frames(FRAMES, cfg.holdout_fraction)
    for b in range(6):
        t_src, clip_src, spk_src = decode(batch["source"][b])
        t_drv, clip_drv, _ = decode(batch["driver"][b])
        t_oth, _, spk_oth = decode(batch["other"][b])
        assert clip_src == clip_drv and abs(t_src - t_drv) >= cfg.min_frame_gap
        assert t_src < limit and t_drv < limit  # the held-out tail is never trained on
        assert batch["source_pose"][b, 0] == t_src and batch["driver_pose"][b, 0] == t_drv
        assert batch["other_pose"][b, 0] == t_oth
        # expression and the driver's mouth box travel with their frames (mouth_open = 0.01 t here)
        assert torch.isclose(batch["driver_expression"][b, 0], torch.tensor(0.01 * t_drv))
        assert torch.isclose(batch["source_expression"][b, 0], torch.tensor(0.01 * t_src))
        x0, y0, x1, y1 = batch["driver_mouth"][b].tolist()
        assert 0 <= x0 < 0.35 and 0.65 < x1 <= 1 and y0 < 0.7 and 0.8 < y1 <= 1  # lips inside, with a margin
        assert spk_oth != spk_src and batch["speaker"][b] == spk_src and batch["other_speaker"][b] == spk_oth
        assert spk_src != 3  # speaker 3 is in the test split only


def test_sources_at_rest_have_the_mouth_closed_and_drivers_do_not(shards):
    shard_set = open_shards(shards)
    cfg = data_config(source_at_rest=1.0)
    limit = train_frames(FRAMES, cfg.holdout_fraction)
    rest_limit = np.percentile(np.arange(limit), cfg.rest_percentile)  # mouth_open = 0.01 t in these clips
    sources, drivers = [], []
    for batch in take(pair_batches(shard_set, SIZE, cfg, batch_size=6, seed=0), 4):
        for b in range(6):
            t_src, clip_src, _ = decode(batch["source"][b])
            t_drv, clip_drv, _ = decode(batch["driver"][b])
            assert clip_src == clip_drv and abs(t_src - t_drv) >= cfg.min_frame_gap and t_drv < limit
            sources.append(t_src)
            drivers.append(t_drv)
    assert max(sources) <= rest_limit < max(drivers)
    # half the pairs at rest: both kinds of source come
    mixed = [
        decode(batch["source"][b])[0]
        for batch in take(pair_batches(shard_set, SIZE, data_config(source_at_rest=0.5), batch_size=6, seed=0), 4)
        for b in range(6)
    ]
    assert min(mixed) <= rest_limit < max(mixed)
    # a lower rest percentile keeps the sources to the most closed frames only
    strict = data_config(source_at_rest=1.0, rest_percentile=5.0)
    strict_limit = np.percentile(np.arange(limit), 5.0)
    closed = [
        decode(batch["source"][b])[0]
        for batch in take(pair_batches(shard_set, SIZE, strict, 6, seed=0), 4)
        for b in range(6)
    ]
    assert max(closed) <= strict_limit and len(set(closed)) < len(set(sources))  # fewer, more closed frames


def test_rest_frames_ignore_unmeasured_frames_and_the_held_out_tail():
    opening = np.array([0.5, np.nan, 0.1, 0.2, 0.9, 0.0, 0.05])
    assert rest_frames(opening, 5, 25.0) == [2]  # finite head [0.5, 0.1, 0.2, 0.9]: 25th percentile 0.175
    assert rest_frames(np.full(4, np.nan), 4, 25.0) == []
    assert rest_frames(opening, 5, percentile=100.0) == [0, 2, 3, 4]
    assert draw_rest_pair(random.Random(0), [0], 2, 2) is None  # no driver 2 frames away


def test_stream_is_deterministic_per_seed_epoch_and_rank(shards):
    shard_set = open_shards(shards)
    source = pair_batches(shard_set, SIZE, data_config(), batch_size=4, seed=0)
    first, again = take(source, 3), take(source, 3)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, again, strict=True) for k in a)
    other_epoch = take(source, 3, epoch=1)
    other_rank = take(source, 3, rank=1, world=2)
    assert not all(torch.equal(a["source"], b["source"]) for a, b in zip(first, other_epoch, strict=True))
    assert not all(torch.equal(a["source"], b["source"]) for a, b in zip(first, other_rank, strict=True))


def test_worker_process_gives_the_same_stream_as_in_process(shards):
    shard_set = open_shards(shards)
    inline = take(pair_batches(shard_set, SIZE, data_config(workers=0), 4, seed=3), 2)
    worker = take(pair_batches(shard_set, SIZE, data_config(workers=1), 4, seed=3), 2)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(inline, worker, strict=True) for k in a)


def test_shards_split_by_node_then_by_worker():
    shards = tuple(f"s{i}" for i in range(8))
    slices = [worker_shards(shards, rank, 2, worker, 2) for rank in range(2) for worker in range(2)]
    assert sorted(s for part in slices for s in part) == sorted(shards)  # a partition
    assert slices[0] == ("s0", "s4") and slices[1] == ("s2", "s6") and slices[2] == ("s1", "s5")
    assert worker_shards(shards[:3], 0, 2, 0, 2) == shards[:3]  # fewer shards than slices: all


def test_heldout_pairs_come_from_the_tail_frames_and_the_test_split(shards):
    shard_set = open_shards(shards)
    cfg = data_config()
    groups = heldout_batch(shard_set, SIZE, cfg, seed=0)
    assert set(groups) == {"frames", "speakers"}
    limit = train_frames(FRAMES, cfg.holdout_fraction)
    frames = groups["frames"]
    assert frames["source"].shape[0] == cfg.eval_pairs
    for b in range(cfg.eval_pairs):
        assert decode(frames["source"][b])[0] >= limit and decode(frames["driver"][b])[0] >= limit
    assert {decode(img)[2] for img in groups["speakers"]["source"]} == {3}
    assert (groups["speakers"]["speaker"] == -1).all()  # not a train speaker
    again = heldout_batch(shard_set, SIZE, cfg, seed=0)
    assert torch.equal(again["frames"]["driver"], frames["driver"])


def test_bad_shard_folders_fail_with_a_clear_error(tmp_path, shards):
    with pytest.raises(InputError, match="not found"):
        open_shards(tmp_path / "nowhere")
    one = write_synthetic_shards(tmp_path / "one", {"train": [[(0, 0), (1, 0)]]})
    with pytest.raises(InputError, match="at least 2"):
        open_shards(one)
    index = json.loads((shards / "index.json").read_text())
    index["splits"]["train"]["shards"].append({"shard": "train-9-0000.tar", "samples": 1, "frames": 1})
    broken = tmp_path / "broken"
    broken.mkdir()
    for tar in shards.glob("*.tar"):
        (broken / tar.name).symlink_to(tar)
    (broken / "index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="missing shards"):
        open_shards(broken)
    index["dataset"] = {"schema_version": schema.SCHEMA_VERSION + 1}
    index["splits"]["train"]["shards"].pop()
    (broken / "index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="schema version"):
        open_shards(broken)


def test_a_shuffle_buffer_of_one_speaker_still_finds_cross_identity_frames(shards):
    """Regression: with few speakers a full buffer of one speaker happens by chance (it stopped a
    200-step run at step ~150); evicted clips keep other speakers in reach."""
    shard_set = open_shards(shards)
    for batch in take(pair_batches(shard_set, SIZE, data_config(shuffle_buffer=1, pairs_per_clip=2), 4, seed=0), 4):
        for b in range(4):
            assert decode(batch["other"][b])[2] != decode(batch["source"][b])[2]


def test_a_worker_whose_shards_hold_one_speaker_fails_clearly(tmp_path, monkeypatch):
    from vasa.loaders import pairs

    monkeypatch.setattr(pairs, "STARVED_CLIPS", 5)
    root = write_synthetic_shards(tmp_path / "s", {"train": [[(0, 0)], [(1, 1)]]})
    shard_set = open_shards(root)
    lonely = dataclasses.replace(shard_set, splits={"train": shard_set.train[:1]})  # only speaker 0's shard
    with pytest.raises(InputError, match="without a second speaker"):
        take(pair_batches(lonely, SIZE, data_config(), 2, seed=0), 1)


def test_only_the_wanted_frames_are_decoded_and_decoding_stops_after_the_last(shards, monkeypatch):
    mp4 = next(read_samples(sorted(shards.glob("train-*.tar"))[0]))[schema.MP4]
    got = decode_some(mp4, SIZE, {7, 3})
    assert sorted(got) == [3, 7] and got[3].shape == (SIZE, SIZE, 3)
    assert [round(float(got[i][..., 0].mean()) / 12) for i in (3, 7)] == [3, 7]  # red = 12 x frame index
    assert decode_some(mp4, SIZE, {FRAMES + 5}) == {} and decode_some(mp4, SIZE, ()) == {}
    # The stream asks for the frames of its pairs and spares only, never a held-out one.
    asked = []
    monkeypatch.setattr("vasa.loaders.pairs.decode_some", lambda mp4, size, wanted: asked.append(set(wanted)) or
                        decode_some(mp4, size, wanted))  # fmt: skip
    cfg = data_config()
    take(pair_batches(open_shards(shards), SIZE, cfg, batch_size=4, seed=0), 3)
    assert asked and all(len(w) <= 3 * cfg.pairs_per_clip and max(w) < train_frames(FRAMES, cfg.holdout_fraction)
                         for w in asked)  # fmt: skip


def test_a_worker_holds_a_bounded_number_of_decoded_frames(shards):
    """Memory is bounded by frames, not by clip length: count the live decoded frames while streaming."""
    import gc

    cfg = data_config(shuffle_buffer=2, pairs_per_clip=3)
    stream = iter(PairStream(open_shards(shards), SIZE, cfg, seed=0, epoch=0, rank=0, world=1))
    peak = 0
    for _ in range(60):
        next(stream)
        peak = max(peak, sum(type(o) is Frame for o in gc.get_objects()))
    assert 0 < peak <= worker_frames(cfg), (peak, worker_frames(cfg))
