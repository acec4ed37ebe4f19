"""Bundles whole or refused, and an export that never destroys the previous bundle (issue 24, part 2):
vasa/core/weights.py (sealed model.json, confined and bounded weight files), vasa/inference/bundle.py
(BundleMeta, shapes on the meta device, finite weights, ONNX tied to the bundle) and
vasa/stages/export.py (staged export swapped in atomically)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures_pipeline import write_tiny_bundle
from vasa.core.errors import InputError
from vasa.core.weights import MODEL_JSON, canonical_json, seal, write_weights
from vasa.inference.bundle import load_bundle
from vasa.models.face_latent import FaceLatent
from vasa.models.motion_dit import MotionDiT
from vasa.models.presets import get_motion_preset, get_preset
from vasa.stages import export as export_mod

REPO = Path(__file__).resolve().parents[1]


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path, with its bytes (byte-identity of a whole bundle)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name, data in _tree(src).items():
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (dst / name).write_bytes(data)
    return dst


def _edit(folder: Path, change) -> None:
    """Change model.json with `change(meta)` and re-seal it: a deliberate edit, past the seal, so that
    the checks behind it are what refuses the bundle."""
    meta = json.loads((folder / MODEL_JSON).read_text())
    change(meta)
    (folder / MODEL_JSON).write_bytes(canonical_json(seal(meta)))


@pytest.fixture(scope="module")
def good(params, tmp_path_factory) -> Path:
    return write_tiny_bundle(params, tmp_path_factory.mktemp("good"))


def test_every_single_byte_change_of_model_json_is_refused_naming_the_file(good, tmp_path):
    raw = (good / MODEL_JSON).read_bytes()
    broken = _copy(good, tmp_path / "b")
    settings = [raw.index(key.encode()) for key in ('"crop_size"', '"steps"', '"cfg_audio"', '"std"', '"fps"')]
    positions = sorted({*range(0, len(raw), max(1, len(raw) // 300)), *(p + k for p in settings for k in range(16))})
    for position in positions:
        for new in {raw[position] ^ 0x01, ord(" "), ord("7")} - {raw[position]}:
            flipped = bytearray(raw)
            flipped[position] = new
            (broken / MODEL_JSON).write_bytes(bytes(flipped))
            with pytest.raises(InputError, match="model.json"):
                load_bundle(broken)
    (broken / MODEL_JSON).write_bytes(raw)
    assert load_bundle(broken).sha256 == load_bundle(good).sha256  # the original bytes still load


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["weights"]["face_latent"].update(file="../../etc/passwd"), "not a file name inside the folder"),
        (lambda m: m["weights"]["face_latent"].update(file="/etc/passwd"), "not a file name inside the folder"),
        (lambda m: m.pop("sampling"), "sampling: Field required"),
        (lambda m: m["sampling"].update(cfg_audio=float("nan")), "sampling.cfg_audio"),
        (lambda m: m["sampling"].update(steps=100000), "train_steps"),
        (lambda m: m["crop"].update(crop_size="512"), "crop.crop_size"),
        (lambda m: m["face_latent"]["preset"].update(resolution=1_000_000), "resolution"),
        (lambda m: m["face_latent"]["preset"].update(volume_channels=4096), "has shape"),
        (lambda m: m["face_latent"].update(n_speakers=7), "has shape"),
        (lambda m: m["normalisation"]["motion"]["std"].__setitem__(0, 0.0), "std must be positive"),
        (lambda m: m.update(version=1), "re-export"),
        (lambda m: m.update(format="something-else"), "not a vasa-bundle"),
        (lambda m: m["weights"].pop("motion_dit"), "a bundle has"),
    ],
)
def test_malformed_model_json_is_refused_with_a_clear_message(good, tmp_path, change, message):
    broken = _copy(good, tmp_path / "b")
    _edit(broken, change)
    started = time.perf_counter()
    with pytest.raises(InputError, match=message):
        load_bundle(broken)
    assert time.perf_counter() - started < 10  # absurd sizes are compared on the meta device, not allocated


def test_weight_files_must_be_the_regular_files_model_json_names(good, tmp_path):
    swapped = _copy(good, tmp_path / "swapped")
    face, dit = swapped / "face_latent.safetensors", swapped / "motion_dit.safetensors"
    face_bytes = face.read_bytes()
    face.write_bytes(dit.read_bytes())
    dit.write_bytes(face_bytes)
    with pytest.raises(InputError, match="sha256 does not match"):
        load_bundle(swapped)

    truncated = _copy(good, tmp_path / "truncated")
    path = truncated / "motion_dit.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(InputError, match="sha256 does not match"):
        load_bundle(truncated)
    import hashlib

    _edit(truncated, lambda m: m["weights"]["motion_dit"].update(sha256=hashlib.sha256(path.read_bytes()).hexdigest()))
    with pytest.raises(InputError, match="not a safetensors file"):
        load_bundle(truncated)

    device = _copy(good, tmp_path / "device")
    (device / "motion_dit.safetensors").unlink()
    (device / "motion_dit.safetensors").symlink_to("/dev/zero")
    with pytest.raises(InputError, match="not a regular file"):
        load_bundle(device)  # refused at once: never hashed or read

    endless = _copy(good, tmp_path / "endless")
    (endless / MODEL_JSON).unlink()
    (endless / MODEL_JSON).symlink_to("/dev/zero")
    with pytest.raises(InputError, match="not a regular file"):
        load_bundle(endless)

    linked = _copy(good, tmp_path / "linked")  # DVC's symlink cache type: a link to a regular file is fine
    elsewhere = tmp_path / "cache-face"
    (linked / "face_latent.safetensors").rename(elsewhere)
    (linked / "face_latent.safetensors").symlink_to(elsewhere)
    assert load_bundle(linked).sha256 == load_bundle(good).sha256


def test_deep_or_huge_json_is_refused(good, tmp_path):
    deep = _copy(good, tmp_path / "deep")
    (deep / MODEL_JSON).write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(InputError, match="model.json: (not JSON|.*over the limit)"):
        load_bundle(deep)
    (deep / MODEL_JSON).write_text("[" * 50_000 + "]" * 50_000)
    with pytest.raises(InputError, match="model.json: not JSON"):
        load_bundle(deep)


def test_non_finite_weights_are_refused_naming_the_tensor(params, tmp_path):
    folder = write_tiny_bundle(params, tmp_path / "nan")
    path = folder / "motion_dit.safetensors"
    from safetensors.torch import load_file

    state = load_file(str(path))
    state["out.weight"][0, 0] = float("nan")
    save_file(state, str(path), metadata={"module": "motion_dit"})
    import hashlib

    _edit(folder, lambda m: m["weights"]["motion_dit"].update(sha256=hashlib.sha256(path.read_bytes()).hexdigest()))
    with pytest.raises(InputError, match=r"non-finite weights in motion_dit\.out\.weight"):
        load_bundle(folder)


def test_onnx_files_of_another_bundle_are_refused(good, tmp_path):
    folder = _copy(good, tmp_path / "b")
    onnx = folder / "onnx"
    onnx.mkdir()
    (onnx / "renderer.onnx").write_bytes(b"graph")
    (onnx / "denoiser.onnx").write_bytes(b"graph")
    import hashlib

    digest = hashlib.sha256(b"graph").hexdigest()
    report = {kind: {"file": f"{kind}.onnx", "sha256": digest} for kind in ("renderer", "denoiser")}
    (onnx / "onnx.json").write_text(json.dumps({**report, "bundle_sha256": "0" * 64}))
    with pytest.raises(InputError, match="ONNX files of another bundle"):
        load_bundle(folder)
    sha = load_bundle(good).sha256
    (onnx / "onnx.json").write_text(json.dumps({**report, "bundle_sha256": sha}))
    assert load_bundle(folder).sha256 == sha  # the same files, tied to this bundle: accepted
    (onnx / "denoiser.onnx").write_bytes(b"other graph")
    with pytest.raises(InputError, match="denoiser.onnx: does not match"):
        load_bundle(folder)


# --- export: staged, checked, swapped in -------------------------------------------------------------


def _stage_outputs(params, folder: Path, seed: int) -> tuple[Path, Path]:
    """A train-latent and a train-motion `model/` folder of seeded tiny networks."""
    torch.manual_seed(seed)
    face = FaceLatent(get_preset("tiny"), n_speakers=2)
    pre, motion = params.preprocess, params.train_motion
    audio_dim = pre.sample_rate // pre.audio.hop_length // pre.fps * pre.audio.n_mels
    motion_dim = 7 + face.preset.dynamics_dim
    dit = MotionDiT(get_motion_preset("tiny"), motion_dim, audio_dim, 2, motion.window, motion.context)
    latent, dit_dir = folder / "latent", folder / "motion"
    write_weights(
        latent, {"generator": face.state_dict()}, {"task": {"preset": face.preset.describe(), "n_speakers": 2}}
    )
    task = {
        "task": "train_motion", "preset": dit.preset.describe(),
        "motion_dim": motion_dim, "audio_dim": audio_dim, "emotion_dim": 2,
        "window": motion.window, "context": motion.context,
        "diffusion": motion.diffusion.model_dump(), "guidance": motion.guidance.model_dump(),
    }  # fmt: skip
    normalisation = {"motion": {"mean": [0.0] * motion_dim, "std": [0.5] * motion_dim}}
    write_weights(dit_dir, {"dit": dit.state_dict()}, {"task": task, "lineage": {}, "normalisation": normalisation})
    return latent, dit_dir


@pytest.fixture(scope="module")
def stages(params, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("stages")
    return {"old": _stage_outputs(params, root / "old", 1), "new": _stage_outputs(params, root / "new", 2)}


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_export_replaces_the_bundle_whole_and_leaves_nothing_beside_it(params, stages, tmp_path):
    out = tmp_path / "bundle"
    first = export_mod.export(params, *stages["old"], out)
    old = _tree(out)
    second = export_mod.export(params, *stages["new"], out)
    assert first != second and load_bundle(out).sha256 == second and _tree(out) != old
    assert _leftovers(out) == []
    assert export_mod.export(params, *stages["new"], out) == second  # same inputs, same bundle


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
@pytest.mark.parametrize("fails", ["write_bundle", "load_bundle", "swap"])
def test_a_failed_export_leaves_the_previous_bundle_byte_identical(params, stages, tmp_path, monkeypatch, fails,
                                                                    exchange):  # fmt: skip
    out = tmp_path / "bundle"
    export_mod.export(params, *stages["old"], out)
    before = _tree(out)
    if not exchange:
        monkeypatch.setattr(export_mod, "_exchange", lambda a, b: False)

    class Killed(BaseException):
        """Stands for SIGKILL: nothing after it runs (not even `except Exception`)."""

    if fails == "swap":  # the fallback's worst moment: the old bundle renamed away, the new not yet in
        real_rename = Path.rename

        def rename(self, target):
            if Path(target) == out and ".export-" in self.name:
                raise Killed
            return real_rename(self, target)

        monkeypatch.setattr(Path, "rename", rename)
        if exchange:
            monkeypatch.setattr(export_mod, "_exchange", lambda a, b: (_ for _ in ()).throw(Killed()))
    else:
        monkeypatch.setattr(export_mod, fails, lambda *a, **k: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        export_mod.export(params, *stages["new"], out)
    monkeypatch.undo()
    export_mod.recover(out)  # what the next export does first
    assert _tree(out) == before and load_bundle(out)
    assert _leftovers(out) == []


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_whole_bundle(params, stages, tmp_path):
    """Real kills at spread-out moments of a real export (ONNX included: the longest write): OUT is
    always either the previous bundle, byte for byte, or the new one, and loads."""
    out = tmp_path / "bundle"
    export_mod.export(params, *stages["old"], out)
    before = _tree(out)
    script = (
        "import sys; from pathlib import Path; from vasa.core.config import load_params; "
        "from vasa.stages.export import export; "
        "export(load_params(Path('params.yaml')), Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), onnx=True)"
    )
    command = [sys.executable, "-c", script, *map(str, stages["new"]), str(out)]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    full = time.perf_counter() - started
    after = _tree(out)
    export_mod.export(params, *stages["old"], out)  # back to the old bundle for the kills
    outcomes = set()
    for fraction in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95):
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(full * fraction)
        process.send_signal(signal.SIGKILL)
        process.wait()
        export_mod.recover(out)
        tree = _tree(out)
        assert tree in (before, after), f"a kill at {fraction:.0%} of the export left a mixed bundle"
        assert load_bundle(out)
        outcomes.add("old" if tree == before else "new")
        if tree == after:
            export_mod.export(params, *stages["old"], out)
    assert "old" in outcomes
    assert _leftovers(out) == []
    assert os.listdir(out)


def test_recover_restores_the_bundle_a_kill_left_between_two_renames(good, tmp_path):
    """The fallback swap's gap: OUT renamed away, the process killed before the new bundle took its name."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    out = tmp_path / "bundle"
    retired = _copy(good, tmp_path / export_mod.RETIRED.format(name="bundle", pid=pid))
    staging = _copy(good, tmp_path / export_mod.STAGING.format(name="bundle", pid=pid))
    export_mod.recover(out)
    assert not retired.exists() and not staging.exists()
    assert _tree(out) == _tree(good) and load_bundle(out)


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2(RENAME_EXCHANGE) is Linux's")
def test_exchange_trades_two_folders_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    assert export_mod._exchange(a, b)
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
