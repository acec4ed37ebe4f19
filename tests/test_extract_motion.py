"""extract_motion (vasa/stages/extract_motion.py): a tiny stage-1 motion encoder over synthetic shards written here
with the schema's members -> motion shards, stats over the train split, incremental re-runs.

Every synthetic frame t carries its index in mel.npy (column 0 of its 4 mel rows = t), so windows can be
traced back to frames after normalisation."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from preprocessing import schema
from preprocessing.media import write_mp4
from preprocessing.shards import Sample, write_shard
from tests.test_data_loader import _npy
from vasa.core.config import ExtractMotionConfig
from vasa.core.errors import InputError
from vasa.core.weights import write_weights
from vasa.inference.encoder import load_stage1_encoder
from vasa.loaders.motion import AUDIO, DISTANCE, EMOTION, INDEX_FILE, MEMBERS, MOTION, STATS_FILE
from vasa.loaders.shards import read_samples
from vasa.models.motion_encoder import MotionEncoder
from vasa.models.presets import get_preset
from vasa.stages.extract_motion import extract

FRAMES, SIDE, MELS, K_MEL = 40, 32, 80, 4
_FIXTURE: dict[str, Path] = {}  # motion_fixture's folders, shared by the modules that import the fixture
LAYOUT = {"train": [[(0, 0), (1, 1)], [(2, 0), (3, 1)]], "test": [[(4, 2)]]}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_sample(tmp: Path, clip: int, speaker: int, split: str, frames: int = FRAMES) -> Sample:
    """A talking 'face': a bright box whose height follows a loudness envelope, moving with the clip."""
    rng = np.random.default_rng(clip)
    envelope = np.clip(np.sin(np.arange(frames) / (2 + clip)) + rng.normal(0, 0.2, frames), 0, None)
    video = np.full((frames, SIDE, SIDE, 3), 40, np.uint8)
    for t in range(frames):
        top = 8 + int(3 * np.sin(t / 5 + clip))
        video[t, top : top + 6 + int(8 * envelope[t]), 10:22] = (200, 150 - 20 * speaker, (100 + 30 * clip) % 256)
    path = tmp / f"clip{clip}.mp4"
    write_mp4(path, video, fps=25, crf=10, preset="ultrafast")
    pose = np.zeros((frames, len(schema.POSE_COLUMNS)), np.float32)
    pose[:, 0] = 5 * np.sin(np.arange(frames) / 7)
    pose[:, schema.POSE_COLUMNS.index("scale_px")] = 8 + clip
    gaze = np.stack([np.full(frames, clip, np.float32), np.full(frames, -clip, np.float32)], 1)
    expression = np.tile(np.arange(len(schema.EXPRESSION_COLUMNS), dtype=np.float32), (frames, 1)) + clip
    mel = np.repeat(envelope[:, None], K_MEL * MELS, 1).reshape(frames * K_MEL, MELS).astype(np.float32)
    mel[:, 0] = np.repeat(np.arange(frames), K_MEL)  # frame index, for tracing windows
    key = f"{clip:04d}abcd_0"
    meta = {"key": key, "split": split, "provenance": {"speaker_id": f"spk{speaker}", "split": split, "key": key}}
    members = {
        schema.MP4: path.read_bytes(),
        schema.POSE: _npy(pose),
        schema.GAZE: _npy(gaze),
        schema.EXPRESSION: _npy(expression),
        schema.MEL: _npy(mel),
        schema.JSON: json.dumps(meta).encode(),
    }
    path.unlink()
    return Sample(key, members, frames=frames, seconds=frames / 25)


def write_shards(root: Path, layout=LAYOUT, frames: int = FRAMES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    index = {"dataset": {"schema_version": schema.SCHEMA_VERSION, "crop_size": SIDE, "fps": 25}, "splits": {}}
    for split, shards in layout.items():
        entries = []
        for n, members in enumerate(shards):
            name = f"{split}-{n}-0000.tar"
            write_shard(root / name, [synthetic_sample(root, c, s, split, frames) for c, s in members])
            entries.append({"shard": name, "samples": len(members), "frames": frames * len(members)})
        index["splits"][split] = {"shards": entries}
    (root / INDEX_FILE).write_text(json.dumps(index))
    return root


def write_stage1(folder: Path, seed: int = 0) -> Path:
    """A tiny stage-1 output: the generator's motion encoder weights (keys `motion.*`) + model.json."""
    preset = get_preset("tiny", SIDE)
    torch.manual_seed(seed)
    encoder = MotionEncoder(preset)
    state = {f"motion.{k}": v for k, v in encoder.state_dict().items()}
    write_weights(folder, {"generator": state}, {"task": {"task": "train_latent", "preset": preset.describe()}})
    return folder


def extract_cfg(**changes) -> ExtractMotionConfig:
    return ExtractMotionConfig.from_data({"batch_size": 16, "device": "cpu", "std_floor": 1e-4} | changes)


@pytest.fixture(scope="session")
def motion_fixture(tmp_path_factory) -> dict[str, Path]:
    """Synthetic shards, a tiny stage-1 model and their motion shards (extracted once per session; the
    loader and train-motion tests import this fixture; the cache makes them share one extraction)."""
    if _FIXTURE:
        return _FIXTURE
    root = tmp_path_factory.mktemp("extract")
    shards, stage1 = write_shards(root / "shards"), write_stage1(root / "stage1" / "model")
    extract(extract_cfg(), shards, stage1, root / "motion", progress=False)
    _FIXTURE.update(shards=shards, stage1=stage1, motion=root / "motion")
    return _FIXTURE


def load(sample: dict[str, bytes], member: str) -> np.ndarray:
    import io

    return np.load(io.BytesIO(sample[member]), allow_pickle=False)


def digests(folder: Path) -> dict[str, str]:
    """Every file under `folder` (the train arrays included), by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def test_motion_shards_have_the_members_shapes_and_provenance(motion_fixture):
    index = json.loads((motion_fixture["motion"] / INDEX_FILE).read_text())
    inputs = json.loads((motion_fixture["shards"] / INDEX_FILE).read_text())
    names = lambda ix: {s: [e["shard"] for e in v["shards"]] for s, v in ix["splits"].items()}  # noqa: E731
    assert names(index) == names(inputs)  # same shard names per split
    encoder = load_stage1_encoder(motion_fixture["stage1"], "cpu")
    dims = 7 + get_preset("tiny").dynamics_dim
    assert index["dataset"]["dims"] == {"motion": dims, "audio": K_MEL * MELS, "emotion": 2}
    for entry in inputs["splits"].values():
        for shard in entry["shards"]:
            pairs = zip(
                read_samples(motion_fixture["shards"] / shard["shard"]),
                read_samples(motion_fixture["motion"] / shard["shard"]),
                strict=True,
            )
            for source, out in pairs:
                assert out["__key__"] == source["__key__"]
                assert sorted(k for k in out if k != "__key__") == sorted(MEMBERS)
                assert out[schema.JSON] == source[schema.JSON]  # provenance unchanged
                motion = load(out, MOTION)
                assert motion.shape == (FRAMES, dims) and motion.dtype == np.float32
                audio = load(out, AUDIO)
                assert audio.shape == (FRAMES, K_MEL * MELS)
                np.testing.assert_array_equal(audio[:, 0], np.arange(FRAMES))  # frame t's mel is row t
                scale = load(source, schema.POSE)[:, schema.POSE_COLUMNS.index("scale_px")]
                np.testing.assert_allclose(load(out, DISTANCE)[:, 0], np.log(SIDE / scale), rtol=1e-6)
                assert load(out, EMOTION).shape == (FRAMES, 2)
                np.testing.assert_array_equal(load(out, schema.GAZE), load(source, schema.GAZE))
    # The stored motion is the encoder's output on the decoded frames, its head pose the shards' measured pose
    # (z_pose units) and its expression dims their measured expression relative to the clip's rest.
    import torch

    from vasa.loaders.shards import decode_frames
    from vasa.models.motion_encoder import EXPRESSION_DIMS, POSE_DIM, REST_PERCENTILES, shard_pose_to_model

    first = next(read_samples(motion_fixture["shards"] / "train-0-0000.tar"))
    pose = load(first, schema.POSE)
    expected = encoder.encode(decode_frames(first[schema.MP4], SIDE), 7, load(first, schema.EXPRESSION), pose, SIDE)
    assert encoder.measured_expression and encoder.measured_pose
    measured = shard_pose_to_model(torch.from_numpy(pose), SIDE, encoder.canonical_scale).numpy()
    np.testing.assert_allclose(expected[:, :POSE_DIM], measured, atol=1e-6)
    expected[:, :POSE_DIM] -= np.median(expected[:, :POSE_DIM], axis=0)  # stored relative to the clip's median pose
    unmeasured = encoder.encode(decode_frames(first[schema.MP4], SIDE), 7)
    assert np.abs(unmeasured[:, :POSE_DIM] - measured).max() > 1e-3  # the estimate is replaced, not equal
    head = expected[:, POSE_DIM : POSE_DIM + EXPRESSION_DIMS]
    head -= np.percentile(head, REST_PERCENTILES, axis=0).diagonal()[None]
    got = load(next(read_samples(motion_fixture["motion"] / "train-0-0000.tar")), MOTION)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.std(got[:, 7:], axis=0).max() > 0  # dynamics vary over the clip


def test_stats_come_from_the_train_split_only(motion_fixture):
    stats = json.loads((motion_fixture["motion"] / STATS_FILE).read_text())
    train = [
        load(s, MOTION)
        for name in ("train-0-0000.tar", "train-1-0000.tar")
        for s in read_samples(motion_fixture["motion"] / name)
    ]
    everything = train + [load(s, MOTION) for s in read_samples(motion_fixture["motion"] / "test-0-0000.tar")]
    train_mean = np.concatenate(train).mean(0)
    np.testing.assert_allclose(stats["motion"]["mean"], train_mean, rtol=1e-5, atol=1e-6)
    std = np.concatenate(train).std(0)
    std = np.where(std < stats["std_floor"], 1.0, std)  # constant dims (the fixture's still expression): centred only
    np.testing.assert_allclose(stats["motion"]["std"], std, rtol=1e-4, atol=1e-6)
    assert stats["expression_rest"]["motion_dims"] == list(range(7, 13))
    assert stats["pose_rest"] == {"motion_dims": list(range(7)), "percentiles": [50.0] * 7}
    assert not np.allclose(stats["motion"]["mean"], np.concatenate(everything).mean(0), atol=1e-6)
    assert stats["frames"] == 4 * FRAMES and stats["split"] == "train"
    assert len(stats["audio"]["mean"]) == K_MEL * MELS
    # A constant mel column (all bins but 0 repeat the envelope; none constant) never divides by ~0.
    assert min(stats["audio"]["std"]) > 0


def test_rerun_redoes_nothing_and_a_changed_shard_is_redone_alone(tmp_path):
    shards = write_shards(tmp_path / "shards", {"train": [[(0, 0)], [(1, 1)]]}, frames=12)
    stage1 = write_stage1(tmp_path / "stage1")
    out = tmp_path / "motion"
    first = extract(extract_cfg(), shards, stage1, out, progress=False)
    assert first == {"redone": 2, "kept": 0, "samples": 2, "failed": 0, "filtered": 0, "realigned": 0}
    before = digests(out)
    again = extract(extract_cfg(), shards, stage1, out, progress=False)
    assert again == {"redone": 0, "kept": 2, "samples": 2, "failed": 0, "filtered": 0, "realigned": 0}
    assert digests(out) == before  # identical bytes, index and stats included
    # Same inputs into a fresh folder: byte-identical output.
    extract(extract_cfg(), shards, stage1, tmp_path / "fresh", progress=False)
    assert digests(tmp_path / "fresh") == before
    # Change one input shard: only it is re-encoded.
    write_shard(shards / "train-1-0000.tar", [synthetic_sample(shards, 7, 1, "train", 12)])
    third = extract(extract_cfg(), shards, stage1, out, progress=False)
    assert third["redone"] == 1 and third["kept"] == 1
    after = digests(out)
    assert after["train-0-0000.tar"] == before["train-0-0000.tar"]
    assert after["train-1-0000.tar"] != before["train-1-0000.tar"]
    assert after["arrays/train/motion.npy"] != before["arrays/train/motion.npy"]  # the arrays follow the shards
    assert not (out / "arrays" / ".train.partial").exists()
    # New stage-1 weights: everything is redone.
    write_stage1(stage1, seed=1)
    assert extract(extract_cfg(), shards, stage1, out, progress=False)["redone"] == 2


def test_bad_inputs_fail_clearly_or_are_recorded(tmp_path):
    stage1 = write_stage1(tmp_path / "stage1")
    with pytest.raises(InputError, match="not found"):
        extract(extract_cfg(), tmp_path / "nowhere", stage1, tmp_path / "out", progress=False)
    shards = write_shards(tmp_path / "shards", {"train": [[(0, 0)]]}, frames=8)
    with pytest.raises(InputError, match="stage-1 model"):
        extract(extract_cfg(), shards, tmp_path / "no_model", tmp_path / "out", progress=False)
    # A sample without its mel member is left out with a recorded reason; the others are kept.
    broken = synthetic_sample(shards, 1, 1, "train", 8)
    del broken.members[schema.MEL]
    write_shard(shards / "train-0-0000.tar", [synthetic_sample(shards, 0, 0, "train", 8), broken])
    counts = extract(extract_cfg(), shards, stage1, tmp_path / "out", progress=False)
    assert counts["samples"] == 1 and counts["failed"] == 1
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert index["failures"][0]["key"] == broken.key and "mel" in index["failures"][0]["reason"]
    assert math.isfinite(json.loads((tmp_path / "out" / STATS_FILE).read_text())["motion"]["mean"][0])


def test_train_arrays_hold_the_train_clips_as_the_shard_reader_normalises_them(motion_fixture):
    from vasa.loaders.motion import ARRAY_MEMBERS, open_motion, read_clip

    root = motion_fixture["motion"]
    motion_set = open_motion(root)
    folder = root / "arrays" / "train"
    clips = [read_clip(sample, motion_set.stats) for path in motion_set.train for sample in read_samples(path)]
    rows = np.load(folder / "clips.npy")
    assert rows.tolist() == [[sum(len(c.motion) for c in clips[:i]), len(clip.motion)] for i, clip in enumerate(clips)]
    assert json.loads((folder / "keys.json").read_text())["keys"] == [
        f"{path.name}/{sample['__key__']}" for path in motion_set.train for sample in read_samples(path)
    ]
    for name in ARRAY_MEMBERS:
        array = np.load(folder / f"{name}.npy", mmap_mode="r")
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, np.concatenate([getattr(c, name) for c in clips]))
    index = json.loads((root / INDEX_FILE).read_text())["dataset"]["arrays"]["train"]
    assert index["frames"] == int(rows[:, 1].sum()) and index["clips"] == len(clips)
    assert index["sha256"]["motion.npy"] == hashlib.sha256((folder / "motion.npy").read_bytes()).hexdigest()
