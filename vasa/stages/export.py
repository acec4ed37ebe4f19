"""Stage `export` (`vasa export`): both stages' EMA weights -> the real-time bundle (format and loader:
vasa/inference/bundle.py). Refuses a motion model trained on another stage-1 model's motion.

The bundle is written whole beside OUT (a hidden staging folder `.<name>.export-<pid>` in OUT's
parent, so on one filesystem), ONNX files included, loaded back with every check of `load_bundle`,
and only then swapped in: with Linux's renameat2(RENAME_EXCHANGE) the old and the new folder trade
places in one step, elsewhere two renames whose gap a later export repairs. A kill at any moment
therefore leaves OUT as it was (the previous bundle, byte for byte) or the new bundle, never a mix.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
from pathlib import Path

from vasa.core import digests
from vasa.core.config import Params
from vasa.core.errors import InputError
from vasa.core.weights import load_weights
from vasa.inference import generate  # noqa: F401  (its code is recorded in every bundle: see code_digest)
from vasa.inference.bundle import build_dit, bundle_meta, load_bundle, upstream_digests, write_bundle
from vasa.models.face_latent import load_face_latent

log = logging.getLogger(__name__)

STAGING = ".{name}.export-{pid}"  # beside OUT: one filesystem, so the swap is a rename
RETIRED = ".{name}.retired-{pid}"  # the old bundle between the two renames of the fallback swap
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def code_digest() -> str:
    """sha256 of the code that builds and runs a bundle: the import closure of this stage and of generation
    (which this stage imports, so that DVC re-exports when generation's code changes), a code version that
    needs no git and ignores everything else."""
    return digests.code_digest((__name__, "vasa.inference.generate"))


def export(
    params: Params, latent: Path, motion_dit: Path, out: Path, dvc_lock: Path | None = None, onnx: bool = False
) -> str:
    """Write the bundle for the stage-1 output `latent` and the stage-2 output `motion_dit` (their
    `model/` folders) into `out`, with its ONNX export when `onnx`. Returns the bundle's sha256."""
    try:
        face, face_meta = load_face_latent(latent)
        dit_weights, dit_meta = load_weights(motion_dit)
    except (FileNotFoundError, OSError) as err:
        raise InputError(f"export needs trained stage outputs: {err}") from None
    except (ValueError, KeyError) as err:
        raise InputError(f"export: {err}") from None
    dit_task = dit_meta.get("task", {})
    if dit_task.get("task") != "train_motion" or "dit" not in dit_weights:
        raise InputError(f"{motion_dit}: not a train-motion output (task {dit_task.get('task')!r})")
    dit = build_dit(dit_task)
    dit.load_state_dict(dit_weights["dit"], strict=True)
    stage1_sha = face_meta["weights"]["generator"]["sha256"]
    if dit_meta["lineage"].get("stage1_weights_sha256") not in (None, stage1_sha):
        raise InputError(
            f"{motion_dit} was trained on motion from another stage-1 model "
            f"({dit_meta['lineage']['stage1_weights_sha256'][:12]} != {stage1_sha[:12]}): re-run extract_motion"
        )
    lineage = {
        "train_latent": {**face_meta.get("lineage", {}), "step": face_meta.get("step"), "weights_sha256": stage1_sha},
        "train_motion": {
            **dit_meta.get("lineage", {}),
            "step": dit_meta.get("step"),
            "weights_sha256": dit_meta["weights"]["dit"]["sha256"],
        },
        "speakers": face_meta.get("speakers", []),
        "dvc_lock": upstream_digests(dvc_lock) if dvc_lock else {},
        "code_sha256": code_digest(),
    }
    meta = bundle_meta(params, face, face_meta["task"]["n_speakers"], dit_task, dit_meta["normalisation"], lineage)
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    staging = out.with_name(STAGING.format(name=out.name, pid=os.getpid()))
    shutil.rmtree(staging, ignore_errors=True)
    try:
        digest = write_bundle(staging, face, dit, meta)
        if onnx:
            from vasa.inference.onnx_export import export_bundle_onnx

            export_bundle_onnx(staging)
        load_bundle(staging)  # the new bundle passes every check before it replaces anything
        swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after the swap: the previous bundle
    log.info("bundle %s in %s", digest[:12], out)
    return digest


def _exchange(a: Path, b: Path) -> bool:
    """Atomically trade the names of two existing paths (Linux renameat2); False where unsupported."""
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is None:
        return False
    if rename(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel or a filesystem without it
        return False
    raise OSError(code, f"exchanging {a} and {b}: {os.strerror(code)}")


def swap_in(new: Path, out: Path) -> None:
    """Make the folder `new` be `out`; afterwards `new` holds the previous `out` (if there was one)."""
    if not out.exists():
        new.rename(out)
        return
    if _exchange(new, out):
        return
    retired = out.with_name(RETIRED.format(name=out.name, pid=os.getpid()))
    out.rename(retired)  # a kill from here to the next rename leaves no `out`: `recover` renames `retired` back
    try:
        new.rename(out)
    except BaseException:
        retired.rename(out)
        raise
    retired.rename(new)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def recover(out: Path) -> None:
    """Undo what a killed export left beside `out`: its staging folder, or, when the kill fell between
    the two renames of the fallback swap, the previous bundle waiting under its retired name."""
    for pattern in (STAGING, RETIRED):
        for leftover in sorted(out.parent.glob(pattern.format(name=out.name, pid="*"))):
            pid = leftover.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or (int(pid) != os.getpid() and _alive(int(pid))):
                continue  # another export still running
            if pattern is RETIRED and not out.exists():
                log.warning("restoring %s from an interrupted export (%s)", out, leftover.name)
                leftover.rename(out)
            else:
                shutil.rmtree(leftover, ignore_errors=True)
