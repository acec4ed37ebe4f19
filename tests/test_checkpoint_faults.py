"""Checkpoint faults (issue 24, part 3): each test does one fault to a run of the engine's ToyTask
(tests/test_training_engine.py, 6 steps, states at steps 3 and 6) and checks the exact message, that
nothing half-written is left and that nothing intact is overwritten.

- a corrupted newest state (a flipped byte in weights, a truncated optimiser, a missing RNG file, a garbled
  engine.json, a missing manifest): --resume warns, falls back to the older state, ends bit-identical
- every state corrupted: one-line CheckpointError, the run's folder untouched
- NaN in the EMA or infinity in a model's weights: refused before a state or the model is written; a state
  holding NaN under valid digests is passed over on resume
- a run killed after logging past its last state: no DVCLive step twice after the resume
- a full disk or an I/O error while a state or the model is written: one-line StorageError, no partial left
"""

from __future__ import annotations

import errno
import hashlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import vasa.core.weights
from tests.test_training_engine import ToyTask, run_toy, toy_batches, toy_config, weights_digest
from vasa.core.errors import CheckpointError, InputError, StorageError
from vasa.core.weights import storage_errors
from vasa.training import checkpoint
from vasa.training.ema import EMA
from vasa.training.engine import _Run, train
from vasa.training.tracking import truncate_series

CFG = toy_config(log_every=1)  # steps 6, a state every 3 steps, a metrics row every step
ENGINE_LOG = "vasa.training.engine"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run: the reference every resumed run must end at, bit for bit."""
    out = tmp_path_factory.mktemp("finished")
    run_toy(out, CFG)
    return out


def killed_copy(finished: Path, tmp_path: Path) -> Path:
    """The finished run as a run killed after its step-6 state and before its model was written."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "model")
    return out


def tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` by relative path: "nothing changed" is an equality of trees."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def flip_last_byte(path: Path) -> None:
    """A bit flipped in the tensor data (safetensors keeps it after the header): still a valid file."""
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path: Path) -> None:
    path.write_text('{"step": 6,')


NO_MANIFEST = "no readable manifest.json (an incomplete state, or one written before states had digests)"
MISMATCH = "does not match its sha256 in manifest.json"
CORRUPTIONS: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "flipped byte in the model's weights": ("model.safetensors", flip_last_byte, f"model.safetensors {MISMATCH}"),
    "flipped byte in the EMA": ("ema.safetensors", flip_last_byte, f"ema.safetensors {MISMATCH}"),
    "truncated optimiser state": ("optimizer.bin", truncate, f"optimizer.bin {MISMATCH}"),
    "missing RNG state": ("random_states_0.pkl", Path.unlink, "random_states_0.pkl is missing"),
    "garbled engine.json": ("engine.json", garble, f"engine.json {MISMATCH}"),
    "missing manifest": ("manifest.json", Path.unlink, NO_MANIFEST),
    "garbled manifest": ("manifest.json", garble, NO_MANIFEST),
}


@pytest.mark.parametrize("fault", CORRUPTIONS)
def test_a_corrupted_newest_state_falls_back_to_the_older_one_with_a_warning(fault, finished, tmp_path, caplog):
    name, corrupt, reason = CORRUPTIONS[fault]
    out = killed_copy(finished, tmp_path)
    newest = checkpoint.state_dir(out / "checkpoints", 6)
    corrupt(newest / name)
    with caplog.at_level(logging.WARNING, logger=ENGINE_LOG):
        resumed = run_toy(out, CFG, resume=True)
    warnings = [r.getMessage() for r in caplog.records if r.name == ENGINE_LOG and r.levelno == logging.WARNING]
    assert warnings == [f"resumable state {newest} skipped: {reason}"]
    assert resumed.step == 6 and weights_digest(out / "model") == weights_digest(finished / "model")
    # The state at step 6 was written again, identical to the uninterrupted run's.
    assert checkpoint.state_problem(newest) is None
    assert tree(newest) == tree(checkpoint.state_dir(finished / "checkpoints", 6))


def test_a_state_holding_nan_under_valid_digests_is_passed_over(finished, tmp_path, caplog):
    """A diverged state sealed as if it were good (older code wrote such states): digests alone pass it."""
    out = killed_copy(finished, tmp_path)
    newest = checkpoint.state_dir(out / "checkpoints", 6)
    ema = load_file(str(newest / checkpoint.EMA_FILE))
    ema["generator/0.weight"].view(-1)[0] = float("nan")
    save_file(ema, str(newest / checkpoint.EMA_FILE))
    checkpoint.write_manifest(newest)
    with caplog.at_level(logging.WARNING, logger=ENGINE_LOG):
        run_toy(out, CFG, resume=True)
    reason = "ema.safetensors: tensor generator/0.weight holds NaN or infinity"
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == ENGINE_LOG] == [
        f"resumable state {newest} skipped: {reason}"
    ]
    assert weights_digest(out / "model") == weights_digest(finished / "model")


def test_no_intact_state_is_one_clear_error_and_changes_nothing(finished, tmp_path):
    out = killed_copy(finished, tmp_path)
    states = out / "checkpoints"
    flip_last_byte(checkpoint.state_dir(states, 6) / "model.safetensors")
    (checkpoint.state_dir(states, 3) / checkpoint.MANIFEST).unlink()
    before = tree(out)
    with pytest.raises(CheckpointError) as caught:
        run_toy(out, CFG, resume=True)
    assert str(caught.value) == (
        f"no intact resumable state in {states} (step_0000006: model.safetensors {MISMATCH}; "
        f"step_0000003: {NO_MANIFEST}); remove it to start over"
    )
    assert isinstance(caught.value, InputError)  # the CLI prints it as one line, exit status 2
    assert tree(out) == before and not (out / "model").exists()
    # Nor does a run without --resume write over the damaged states.
    with pytest.raises(InputError, match="--resume"):
        run_toy(out, CFG)
    assert tree(out) == before


def test_nan_in_the_ema_is_never_saved_nor_published(tmp_path, finished, monkeypatch):
    update = EMA.update
    calls = []

    def goes_nan_at_step_5(self, module):
        update(self, module)
        calls.append(None)
        if len(calls) == 5:  # after the step-3 state: the step-6 state and the model would carry it
            self.shadow["0.weight"].view(-1)[0] = float("nan")

    monkeypatch.setattr(EMA, "update", goes_nan_at_step_5)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError) as caught:
        run_toy(out, CFG)
    assert str(caught.value) == (
        f"step 6: NaN or infinity in EMA generator.0.weight; not saved, the newest state in {out / 'checkpoints'} "
        "is the last good one (lower the learning rate, or check the data)"
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000003"]
    assert not (out / "model").exists()
    # The last good state is a usable one: resumed without the fault, the run ends as an uninterrupted one.
    monkeypatch.undo()
    run_toy(out, CFG, resume=True)
    assert weights_digest(out / "model") == weights_digest(finished / "model")


def test_infinity_in_a_model_without_ema_is_refused_naming_the_tensor(tmp_path, monkeypatch):
    step = _Run.train_step

    def blows_up_at_step_6(self, micro):
        terms = step(self, micro)
        if self.step == 5:  # the sixth step (self.step counts the steps done before it)
            with torch.no_grad():
                self.plain["discriminator"][0].weight.view(-1)[0] = float("inf")
        return terms

    monkeypatch.setattr(_Run, "train_step", blows_up_at_step_6)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"^step 6: NaN or infinity in discriminator\.0\.weight; not saved"):
        run_toy(out, CFG)
    assert [s for s, _ in checkpoint.step_folders(out / "checkpoints")] == [3]
    assert not list((out / "checkpoints").glob("*.partial")) and not (out / "model").exists()


class Killed(Exception):
    """Stands for SIGKILL: raised by the batch source at step 6, after steps 4 and 5 were logged."""


def test_a_resumed_run_logs_every_step_once(finished, tmp_path):
    source = toy_batches(CFG.batch_size, CFG.seed)

    def dies_at_step_6(epoch, rank, world):
        batches = iter(source(epoch, rank, world))
        if epoch == 1:  # steps 4, 5, 6
            yield next(batches)
            yield next(batches)
            raise Killed
        yield from batches

    out = tmp_path / "run"
    with pytest.raises(Killed):
        torch.set_num_threads(1)
        train(ToyTask(), CFG, dies_at_step_6, out, meta={}, resume=False, progress=False)
    series = out / "live" / "plots" / "metrics"
    assert steps_of(series / "lr.tsv") == [1, 2, 3, 4, 5]  # logged past the step-3 state
    run_toy(out, CFG, resume=True)
    reference = finished / "live" / "plots" / "metrics"
    names = sorted(p.relative_to(reference).as_posix() for p in reference.rglob("*.tsv"))
    assert names == sorted(p.relative_to(series).as_posix() for p in series.rglob("*.tsv"))
    for name in names:
        assert steps_of(series / name) == [1, 2, 3, 4, 5, 6], name
        if name != "images_per_s.tsv":  # a timing; every other value is bit-identical on CPU
            assert (series / name).read_text() == (reference / name).read_text(), name


def steps_of(path: Path) -> list[int]:
    return [int(line.split("\t")[0]) for line in path.read_text().splitlines()[1:]]


def test_truncating_series_drops_later_and_torn_rows(tmp_path):
    series = tmp_path / "plots" / "metrics"
    series.mkdir(parents=True)
    (series / "l1.tsv").write_text("step\tl1\n1\t0.5\n2\t0.4\n3\t0.3\n4\t0.2\n5\t0.")
    (series / "lr.tsv").write_text("step\tlr\n1\t0.1\n\t\n")  # a row torn before its step was written
    truncate_series(tmp_path, 3)
    assert (series / "l1.tsv").read_text() == "step\tl1\n1\t0.5\n2\t0.4\n3\t0.3\n"
    assert (series / "lr.tsv").read_text() == "step\tlr\n1\t0.1\n"


def test_a_full_disk_while_a_state_is_written_is_one_line_and_leaves_no_partial(finished, tmp_path, monkeypatch):
    save = checkpoint.save_file

    def full_at_step_6(tensors, filename, metadata=None):
        if "step_0000006" in filename:
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_at_step_6)
    out = tmp_path / "run"
    with pytest.raises(StorageError) as caught:
        run_toy(out, CFG)
    states = out / "checkpoints"
    assert str(caught.value) == f"no space left on device while writing {states / 'step_0000006'}"
    assert sorted(p.name for p in states.iterdir()) == ["step_0000003"]  # no step_0000006.partial left
    assert tree(checkpoint.state_dir(states, 3)) == tree(checkpoint.state_dir(finished / "checkpoints", 3))
    assert not (out / "model").exists()


def test_torch_failing_on_a_full_disk_is_named_a_full_disk(tmp_path, monkeypatch):
    """torch.save's own error on a full disk ("unexpected pos ...") never says so: the free space does."""
    torch_save = torch.save

    def fails_at_step_6(obj, f, *args, **kwargs):
        if "step_0000006" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 640 vs 534")
        return torch_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fails_at_step_6)
    nearly_full = SimpleNamespace(total=1 << 30, used=(1 << 30) - 4096, free=4096)
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: nearly_full)
    out = tmp_path / "run"
    with pytest.raises(StorageError) as caught:
        run_toy(out, CFG)
    states = out / "checkpoints"
    assert str(caught.value) == f"no space left on device while writing {states / 'step_0000006'}"
    assert sorted(p.name for p in states.iterdir()) == ["step_0000003"]


def test_the_same_writer_error_with_room_on_the_disk_stays_what_it_was(tmp_path):
    with pytest.raises(RuntimeError, match="unexpected pos"), storage_errors(tmp_path / "x"):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 640 vs 534")
    with pytest.raises(PermissionError), storage_errors(tmp_path / "x"):
        raise PermissionError(errno.EACCES, "Permission denied")


def test_an_io_error_while_the_model_is_written_keeps_the_published_model(finished, tmp_path, monkeypatch):
    """Resumed at its end, a finished run writes its model again: a failing disk must not leave it half new."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = tree(out / "model")

    def failing_disk(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: Input/output error (os error 5)")

    monkeypatch.setattr(vasa.core.weights, "save_file", failing_disk)
    with pytest.raises(StorageError) as caught:
        run_toy(out, CFG, resume=True)
    assert str(caught.value) == f"input/output error while writing {out / 'model.partial' / 'generator.safetensors'}"
    assert tree(out / "model") == before and not (out / "model.partial").exists()
    assert [checkpoint.state_problem(folder) for _, folder in checkpoint.step_folders(out / "checkpoints")] == [
        None,
        None,
    ]


def test_a_diverged_run_is_one_line_not_a_traceback(monkeypatch, tmp_path, capsys):
    """A non-finite loss stops training (the engine raises before anything is saved for that step); the
    CLI says so in one line with exit 1, and how to go on."""
    import vasa.cli

    def diverge(args, params):
        raise FloatingPointError("step 7: non-finite generator loss nan")

    monkeypatch.setattr(vasa.cli, "_train_motion", diverge)
    argv = ["train-motion", "--motion", str(tmp_path), "--out", str(tmp_path / "run")]
    assert vasa.cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "vasa train-motion: step 7: non-finite generator loss nan: training diverged; "
        "--resume restarts from the last saved state"
    ]
