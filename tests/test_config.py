from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from vasa.core.config import ConfigError, load_params


def _write(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_repo_params_load_and_are_frozen(params):
    assert params.sample.fps == 25
    assert len(params.sample.identities) >= 2
    with pytest.raises(ValueError):
        params.sample.fps = 30  # type: ignore[misc]


def test_unknown_key_is_named_with_file(tmp_path):
    path = _write(tmp_path, lambda d: d["sample"]["motion"].update(yaw_dgs=3))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(path) in str(err.value)
    assert "sample.motion.yaw_dgs: unknown key" in str(err.value)


def test_unknown_section_is_named(tmp_path):
    path = _write(tmp_path, lambda d: d.update(smaple={"seed": 1}))
    with pytest.raises(ConfigError, match="smaple: unknown key"):
        load_params(path)


@pytest.mark.parametrize(
    ("key", "value"),
    [("fps", "25"), ("fps", 25.5), ("size", True), ("min_seconds", "3"), ("identities", "astronaut")],
)
def test_wrong_type_is_rejected(tmp_path, key, value):
    path = _write(tmp_path, lambda d: d["sample"].update({key: value}))
    with pytest.raises(ConfigError, match=rf"sample\.{key}"):
        load_params(path)


def test_missing_key_is_named(tmp_path):
    path = _write(tmp_path, lambda d: d["sample"].pop("crf"))
    with pytest.raises(ConfigError, match=r"sample\.crf: missing key"):
        load_params(path)


def test_out_of_range_and_inconsistent_values(tmp_path):
    path = _write(tmp_path, lambda d: d["sample"].update(min_seconds=7.0))
    with pytest.raises(ConfigError, match="min_seconds"):
        load_params(path)
    path = _write(tmp_path, lambda d: d["sample"]["identities"][0].update(name="Bad Name"))
    with pytest.raises(ConfigError, match=r"sample\.identities\.0\.name"):
        load_params(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sample: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(bad)


def test_duplicate_yaml_keys_are_rejected_naming_the_dotted_key(tmp_path):
    text = (REPO / "params.yaml").read_text()
    # A second `retries:` inside ingest.voxceleb2 would otherwise silently win over the first.
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("    retries: 3", "    retries: 3\n    retries: 5", 1))
    with pytest.raises(ConfigError, match=r"ingest\.voxceleb2\.retries: duplicate key \(lines \d+ and \d+\)"):
        load_params(path)
    path.write_text(text + "\nsample:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"  sample: duplicate key"):
        load_params(path)


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (
            lambda d: d["ingest"]["local"].update(extensions=["mp4"]),
            r"ingest\.local.*extensions must look like '\.mp4'",
        ),
        (lambda d: d["ingest"].update(val_fraction=1.0), r"ingest\.val_fraction"),
        (lambda d: d["ingest"]["voxceleb2"].update(max_extract_bytes=0), r"ingest\.voxceleb2\.max_extract_bytes"),
        (lambda d: d["ingest"]["voxceleb2"].update(part_deadline_s=0), r"ingest\.voxceleb2\.part_deadline_s"),
        (
            lambda d: d["ingest"]["voxceleb2"].update(
                archives=[{"name": "a.zip", "md5": None, "parts": [{"url": "/x", "md5": None, "size": None}]}] * 2
            ),
            r"ingest\.voxceleb2.*archive names must be unique",
        ),
        (lambda d: d["ingest"]["hdtf"].update(subsets=["../RD"]), r"ingest\.hdtf.*letters and digits only"),
        (lambda d: d["ingest"]["celebvhq"].update(enlarge=0.5), r"ingest\.celebvhq\.enlarge"),
        (lambda d: d["ingest"]["talkvid"].update(max_span_s=0), r"ingest\.talkvid\.max_span_s"),
        (lambda d: d["ingest"].update(sources=["sample", "hdtf2"]), r"unknown sources \['hdtf2'\]"),
    ],
    ids=[
        "extension-without-dot",
        "val-fraction-1",
        "zero-extract-limit",
        "zero-deadline",
        "same-archive-twice",
        "hdtf-subset-path",
        "shrinking-enlarge",
        "zero-span-limit",
        "unknown-source",
    ],
)
def test_ingest_params_that_cannot_work_are_rejected(tmp_path, mutate, key):
    with pytest.raises(ConfigError, match=key):
        load_params(_write(tmp_path, mutate))
