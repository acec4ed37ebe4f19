"""Stage `export` (`vasa export`): both stages' EMA weights -> the real-time bundle (format and loader:
vasa/inference/bundle.py). Refuses a motion model trained on another stage-1 model's motion.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vasa.core.config import Params
from vasa.core.errors import InputError
from vasa.core.weights import load_weights
from vasa.inference.bundle import build_dit, bundle_meta, upstream_digests, write_bundle
from vasa.models.face_latent import load_face_latent

log = logging.getLogger(__name__)


def export(params: Params, latent: Path, motion_dit: Path, out: Path, dvc_lock: Path | None = None) -> str:
    """Write the bundle for the stage-1 output `latent` and the stage-2 output `motion_dit` (their
    `model/` folders) into `out`. Returns the bundle's sha256."""
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
    }
    meta = bundle_meta(params, face, face_meta["task"]["n_speakers"], dit_task, dit_meta["normalisation"], lineage)
    digest = write_bundle(out, face, dit, meta)
    log.info("bundle %s in %s", digest[:12], out)
    return digest
