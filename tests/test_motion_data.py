"""The motion-window loader (vasa/loaders/motion.py) on motion shards extracted from synthetic shards: the
batch contract of MotionTask, context handling at clip starts, train split only, seeded streams."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from tests.test_extract_motion import FRAMES, motion_fixture  # noqa: F401 (fixture)
from vasa.core.config import MotionDataConfig
from vasa.core.errors import InputError
from vasa.loaders.motion import heldout_windows, open_motion, read_clip, window_batches
from vasa.loaders.shards import read_samples

W, K, B = 10, 3, 8


def data_cfg(**changes) -> MotionDataConfig:
    return MotionDataConfig.from_data({"eval_windows": 6, "workers": 0} | changes)


def take(source, n: int, epoch: int = 0, rank: int = 0, world: int = 1) -> list[dict]:
    stream = source(epoch, rank, world)
    return [next(stream) for _ in range(n)]


def clips_by_number(motion_set) -> dict[int, object]:
    """Normalised clips of every split, by clip number (gaze theta holds it in the synthetic shards)."""
    out = {}
    for paths in motion_set.splits.values():
        for path in paths:
            for sample in read_samples(path):
                clip = read_clip(sample, motion_set.stats)
                out[int(clip.gaze[0, 0])] = clip
    return out


def frame_index(audio: torch.Tensor, stats: dict) -> np.ndarray:
    """Frame indices from normalised audio rows (mel column 0 holds the frame index)."""
    return np.rint(audio[..., 0].numpy() * stats["audio"]["std"][0] + stats["audio"]["mean"][0]).astype(int)


def test_batches_follow_the_contract_and_context_is_the_previous_frames(motion_fixture):  # noqa: F811
    motion_set = open_motion(motion_fixture["motion"])
    clips = clips_by_number(motion_set)
    dims = motion_set.dims
    batches = take(window_batches(motion_set, data_cfg(), W, K, B, seed=0), 6)
    starts = []
    for batch in batches:
        assert batch["motion"].shape == (B, W, dims["motion"]) and batch["motion"].dtype == torch.float32
        assert batch["motion_pre"].shape == (B, K, dims["motion"])
        assert batch["audio"].shape == (B, W, dims["audio"]) and batch["audio_pre"].shape == (B, K, dims["audio"])
        assert batch["has_pre"].shape == (B,) and batch["has_pre"].dtype == torch.bool
        assert batch["gaze"].shape == (B, 2) and batch["distance"].shape == (B, 1)
        assert batch["emotion"].shape == (B, dims["emotion"])
        for i in range(B):
            number = int(round(batch["gaze"][i, 0].item()))
            assert number in (0, 1, 2, 3)  # train clips only (clip 4 is the test split)
            clip = clips[number]
            frames = frame_index(batch["audio"][i], motion_set.stats)
            start = int(frames[0])
            np.testing.assert_array_equal(frames, np.arange(start, start + W))
            np.testing.assert_allclose(batch["motion"][i].numpy(), clip.motion[start : start + W], atol=1e-6)
            if batch["has_pre"][i]:
                assert start >= K
                np.testing.assert_array_equal(frame_index(batch["audio_pre"][i], motion_set.stats),
                                              np.arange(start - K, start))  # fmt: skip
                np.testing.assert_allclose(batch["motion_pre"][i].numpy(), clip.motion[start - K : start], atol=1e-6)
            else:  # a clip-start window: no context, zeros
                assert start == 0
                assert not batch["motion_pre"][i].any() and not batch["audio_pre"][i].any()
            np.testing.assert_allclose(batch["gaze"][i].numpy(), clip.gaze[start : start + W].mean(0), rtol=1e-6)
            starts.append(start)
    assert 0 in starts and max(starts) > K  # both kinds of window occur
    assert max(starts) <= FRAMES - W
    # Normalised: the train windows' motion is roughly zero-mean, unit-std.
    motion = torch.cat([b["motion"] for b in batches]).flatten(0, 1)
    assert motion.mean(0).abs().median() < 0.5 and 0.5 < motion.std(0).median() < 1.5


def test_streams_are_seeded_and_split_by_rank(motion_fixture):  # noqa: F811
    motion_set = open_motion(motion_fixture["motion"])
    source = window_batches(motion_set, data_cfg(), W, K, B, seed=0)
    a, b = take(source, 3), take(source, 3)
    for x, y in zip(a, b, strict=True):
        for key in x:
            assert torch.equal(x[key], y[key])
    assert not torch.equal(take(source, 1, epoch=1)[0]["motion"], a[0]["motion"])
    assert not torch.equal(
        take(window_batches(motion_set, data_cfg(), W, K, B, seed=1), 1)[0]["motion"], a[0]["motion"]
    )
    # Two ranks: each draws from its own half of the train clips (every other clip in index order).
    seen = {
        rank: {int(round(v)) for batch in take(source, 4, rank=rank, world=2) for v in batch["gaze"][:, 0].tolist()}
        for rank in (0, 1)
    }
    assert seen[0] | seen[1] == {0, 1, 2, 3} and not seen[0] & seen[1]


def test_heldout_windows_come_from_the_test_split_and_are_deterministic(motion_fixture):  # noqa: F811
    motion_set = open_motion(motion_fixture["motion"])
    group, batch = heldout_windows(motion_set, data_cfg(), W, K, seed=0)
    assert group == "heldout" and batch["motion"].shape[0] == 6
    assert set(batch["gaze"][:, 0].round().int().tolist()) == {4}
    again = heldout_windows(motion_set, data_cfg(), W, K, seed=0)[1]
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    assert heldout_windows(motion_set, data_cfg(), FRAMES + 1, K, seed=0) is None  # no clip long enough


def test_bad_motion_folders_fail_clearly(tmp_path, motion_fixture):  # noqa: F811
    with pytest.raises(InputError, match="not found"):
        open_motion(tmp_path)
    (tmp_path / "index.json").write_text('{"splits": {}, "dataset": {"format": "other"}}')
    with pytest.raises(InputError, match="not motion shards"):
        open_motion(tmp_path)
    motion_set = open_motion(motion_fixture["motion"])
    with pytest.raises(InputError, match="frames a window needs"):
        take(window_batches(motion_set, data_cfg(), FRAMES + 1, K, B, seed=0), 1)
    # Shards without their arrays (an older extract-motion): a clear message at once, not in a worker.
    shutil.copytree(motion_fixture["motion"], tmp_path / "old", ignore=shutil.ignore_patterns("arrays"))
    with pytest.raises(InputError, match="re-run extract-motion"):
        window_batches(open_motion(tmp_path / "old"), data_cfg(), W, K, B, seed=0)


def test_worker_processes_yield_the_batches_of_their_own_slices(motion_fixture):  # noqa: F811
    motion_set = open_motion(motion_fixture["motion"])
    one = take(window_batches(motion_set, data_cfg(workers=2), W, K, B, seed=0), 4)
    for batch in one:
        assert batch["motion"].shape == (B, W, motion_set.dims["motion"])
    # Worker 0 and worker 1 draw from disjoint halves of the clips, batch by batch in turn.
    clips = [{int(round(v)) for v in batch["gaze"][:, 0].tolist()} for batch in one]
    assert not (clips[0] | clips[2]) & (clips[1] | clips[3])
