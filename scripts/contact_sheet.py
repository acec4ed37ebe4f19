"""Contact sheet of the preprocess crops with the stored head pose drawn on them, for eyeballing.

    python scripts/contact_sheet.py --videos ../shared/fixtures --out docs/images/fixture_crops_pose.jpg

Each video goes through `preprocessing.process.process_clip` with params.yaml's preprocess section
(crop size overridable): one row per video, the first picture a source frame with the crop box
drawn (mapped back through crop.npy), then crop frames spread over the first sample with the head
axes of pose.npy (crop frame: red x toward the subject's left, green y down, blue facing
direction) and the stored roll. The same inputs give the same image.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
from pathlib import Path

import cv2
import numpy as np

from preprocessing import schema
from preprocessing.decode import read_frames
from preprocessing.pose import Pose, draw_pose_axes
from preprocessing.process import process_clip
from vasa.core.config import load_params

IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _label(image: np.ndarray, text: str, row: int = 0) -> None:
    y = 14 + 14 * row
    cv2.putText(image, text, (4, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(image, text, (4, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)


def video_row(path: Path, cfg, columns: int, cell: int) -> np.ndarray:
    """(cell, (columns + 1) * cell, 3) uint8 RGB: the source with its box, then posed crops."""
    row = {"clip_id": path.name, "key": path.stem, "media_path": str(path), "av_offset": None}
    outcome = process_clip(row, cfg)
    strip = np.zeros((cell, (columns + 1) * cell, 3), np.uint8)
    if not outcome.samples:
        _label(strip, f"{path.name}: no sample ({outcome.failures[0]['reason'] if outcome.failures else '?'})")
        return strip
    sample = outcome.samples[0]
    pose, transforms = _npy(sample.members[schema.POSE]), _npy(sample.members[schema.CROP_TRANSFORM])
    meta = json.loads(sample.members[schema.JSON])
    with tempfile.TemporaryDirectory() as folder:
        video = Path(folder) / "crop.mp4"
        video.write_bytes(sample.members[schema.MP4])
        crops = read_frames(video)[0]
    source = read_frames(path)[0]
    start = meta["segment"][0]
    # The source frame with the crop square mapped back to source pixels (crop.npy: source -> crop).
    first = source[min(start, len(source) - 1)].copy()
    size = cfg.crop_size
    corners = np.array([[0, 0], [size, 0], [size, size], [0, size]], dtype=np.float64)
    linear, offset = transforms[0, :, :2].astype(np.float64), transforms[0, :, 2].astype(np.float64)
    box = (corners - offset) @ np.linalg.inv(linear).T
    thick = max(2, round(max(first.shape[:2]) / cell))
    cv2.polylines(first, [np.round(box).astype(np.int32)], True, (255, 255, 0), thick, cv2.LINE_AA)
    height, width = first.shape[:2]
    fit = cell / max(height, width)
    thumb = cv2.resize(first, (round(width * fit), round(height * fit)), interpolation=cv2.INTER_AREA)
    strip[: thumb.shape[0], : thumb.shape[1]] = thumb
    _label(strip, path.stem[:22])
    _label(strip, f"{meta['crop_mode']} up x{meta['upscale']:.2f}", 1)
    _label(strip, f"out {meta['outside_fraction']:.2f} sharp {meta['sharpness']:.0f}", 2)
    for column, index in enumerate(np.linspace(0, len(crops) - 1, columns).round().astype(int)):
        values = pose[index]
        frame_pose = Pose(values[:1], values[1:2], values[2:3], values[None, 3:6], values[6:7])
        drawn = draw_pose_axes(crops[index], frame_pose, IDENTITY)  # pose.npy is in crop pixels already
        drawn = cv2.resize(drawn, (cell, cell), interpolation=cv2.INTER_AREA)
        _label(drawn, f"t={start + index} roll {values[2]:+.0f}")
        _label(drawn, f"yaw {values[0]:+.0f} pitch {values[1]:+.0f}", 1)
        strip[:, (column + 1) * cell : (column + 2) * cell] = drawn
    return strip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=Path, required=True, help="folder of talking-head videos (*.mp4)")
    parser.add_argument("--out", type=Path, required=True, help="JPEG to write")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--crop-size", type=int, default=256)
    parser.add_argument("--columns", type=int, default=5, help="crop frames per video")
    parser.add_argument("--cell", type=int, default=160, help="pixels per picture")
    args = parser.parse_args(argv)
    cfg = load_params(args.params).preprocess.replace(crop_size=args.crop_size)
    videos = sorted(args.videos.glob("*.mp4"))
    if not videos:
        parser.error(f"no *.mp4 in {args.videos}")
    sheet = np.concatenate([video_row(path, cfg, args.columns, args.cell) for path in videos])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(".jpg", sheet[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise SystemExit("JPEG encoding failed")
    args.out.write_bytes(data.tobytes())
    print(f"wrote {args.out} ({sheet.shape[1]}x{sheet.shape[0]}, {len(videos)} videos)")


if __name__ == "__main__":
    main()
