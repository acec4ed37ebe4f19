"""The shard format: member names, array columns, units and coordinate frames.

Imported by the shard writer (`preprocessing`) and by the training loaders (`vasa`) alike, so it
must stay dependency-light: the standard library only (no numpy, cv2, mediapipe, av, torch).
Bump SCHEMA_VERSION whenever a member, a column, a unit or a frame changes meaning.

Per sample (one face segment of one clip) a shard holds these members, keyed `<key>.<member>`:

    mp4              crop video, CROP_SIZE² at FPS, H.264 (see params preprocess.crop_*)
    wav              16-bit PCM mono at SAMPLE_RATE, exactly T * SAMPLE_RATE / FPS samples
    pose.npy         (T, 7) float32, POSE_COLUMNS, in the CROP frame (below)
    crop.npy         (T, 2, 3) float32, affine map source pixels -> crop pixels for each frame
    landmarks.npy    (T, 478, 3) float16, FaceMesh landmarks in crop pixels (z scaled like x)
    gaze.npy         (T, 2) float32, GAZE_COLUMNS, degrees, relative to the head
    expression.npy   (T, E) float32, EXPRESSION_COLUMNS, template units
    mel.npy          (T * k, n_mels) float32 log-mel, k = mel_frames_per_video_frame
    speech.npy       (T, D) float32 wav2vec2/HuBERT features (only when an encoder is configured)
    json             sample metadata (SAMPLE_JSON_KEYS) including `provenance` from the manifest

Coordinate frames
-----------------
Pixels: x right, y down, z away from the camera (right-handed), origin at the top-left pixel's
corner. SOURCE frame = pixels of the decoded (upright, display-rotation applied) source video.
CROP frame = pixels of the stored crop; `crop.npy[t]` maps source -> crop:
`p_crop = A[:, :2] @ p_source + A[:, 2]`. The default crop (params `preprocess.crop.mode: box`)
is one fixed, axis-aligned box per segment (a uniform scale and a shift, no rotation), so head
roll, translation and scale remain in the pixels; `aligned` mode de-rotates and re-centres each
frame (then roll/translation/scale are largely removed from the pixels, but pose.npy still
describes the crop pixels exactly, because it is measured in the crop frame).

Head pose (pose.npy), as fitted by `preprocessing.pose` (Umeyama similarity to the face template):

    landmark_crop ~= scale * R @ template_point + translation,  R = Rz(roll) @ Rx(pitch) @ Ry(yaw)

Angles in degrees. THE PROJECT'S ONE SIGN CONVENTION (the sample corpus's truth uses it too):
    yaw   > 0: the subject turns to THEIR right (nose toward image left in an unmirrored view)
    pitch > 0: the subject looks down (nose toward image bottom)
    roll  > 0: the head tilts clockwise in the image (the subject's left eye, image right, drops)
Translation in crop pixels (tz is the template-origin depth offset, pixels), scale in crop pixels
per template unit (template unit = outer eye-corner distance).
"""

from __future__ import annotations

SCHEMA_VERSION = 2

# Member names (webdataset extensions) of one sample.
MP4 = "mp4"
WAV = "wav"
POSE = "pose.npy"
CROP_TRANSFORM = "crop.npy"
LANDMARKS = "landmarks.npy"
GAZE = "gaze.npy"
EXPRESSION = "expression.npy"
MEL = "mel.npy"
SPEECH = "speech.npy"
JSON = "json"
MEMBERS = (MP4, WAV, POSE, CROP_TRANSFORM, LANDMARKS, GAZE, EXPRESSION, MEL, JSON)  # always present
OPTIONAL_MEMBERS = (SPEECH,)

POSE_COLUMNS = ("yaw_deg", "pitch_deg", "roll_deg", "tx_px", "ty_px", "tz_px", "scale_px")
POSE_FRAME = "crop"  # pose.npy translation/scale are in crop pixels; see the module docstring
GAZE_COLUMNS = ("theta_deg", "phi_deg")
EXPRESSION_COLUMNS = ("mouth_open", "mouth_width", "smile", "eye_open_right", "eye_open_left", "brow_raise")
N_LANDMARKS = 478

# Splits: whole speakers per split; train and test never share a shard.
TRAIN, VAL, TEST = "train", "val", "test"
SPLITS = (TRAIN, VAL, TEST)

# Provenance columns joined from the manifest into every sample JSON when shards are written
# (never cached with the media-derived members, so a licence or split change never goes stale).
PROVENANCE_COLUMNS = (
    "clip_id",
    "key",
    "speaker_id",
    "source_kind",
    "source_url",
    "youtube_id",
    "utterance",
    "licence",
    "sha256",
    "split",
    "frame_start",
    "frame_end",
    "av_offset",
)

# Files of the preprocess output folder beside the shards. Shards are `<split>-<bucket>-<part>.tar`
# with `<split>-<bucket>-<part>.stats.json` beside each; index.json lists them per split (the only
# files the stage ever removes are the ones its previous index.json lists).
INDEX_FILE = "index.json"
FAILURES_FILE = "failures.parquet"
STATS_SUFFIX = ".stats.json"
# index.json: {"dataset": {DATASET_KEYS...}, "splits": {split: {"shards": [{"shard", "samples",
# "frames"}], "samples", "frames"}}, "failures_by_reason": {reason: count}}
DATASET_KEYS = (
    "schema_version",  # SCHEMA_VERSION of the shards
    "crop_size",  # crop side, pixels
    "crop_mode",  # "box" (one fixed box per segment) | "aligned" (de-rotated per frame)
    "pose_frame",  # POSE_FRAME
    "fps",  # video frames per second
    "sample_rate",  # audio samples per second
    "mel_frames_per_video_frame",  # k in mel.npy's (T * k, n_mels)
    "n_mels",
    "manifest_sha256",  # sha256 of the manifest file the shards were made from
    "splits",  # the splits that have shards, in SPLITS order
)
# failures.parquet: one row per clip or segment left out; every column a string.
FAILURE_COLUMNS = ("clip_id", "key", "status", "reason", "detail", "split")
