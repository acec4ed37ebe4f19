from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from preprocessing.shards import Sample
from tests.fixtures_pipeline import SampleShards, build_sample_shards, write_tiny_bundle
from tests.http_server import Server, running_server
from vasa.core.config import Params, load_params

REPO = Path(__file__).resolve().parents[1]
# The real-media fixtures live beside the checkout (../shared/fixtures); VASA_FIXTURES overrides.
FIXTURES = Path(os.environ.get("VASA_FIXTURES", REPO.parent / "shared" / "fixtures"))


@dataclass
class FakeOutcome:
    """What preprocessing.process.process_clip returns, made up: for tests of the cache, planner and writer."""

    samples: list[Sample] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    frame_rejections: dict[str, int] = field(default_factory=dict)
    transient: bool = False


@pytest.fixture(scope="session")
def params() -> Params:
    return load_params(REPO / "params.yaml")


@pytest.fixture(scope="session")
def sample_corpus(params: Params, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default sample corpus (params.yaml) less its held-out clips (8 training clips, the layout the
    ingest/preprocess tests are written for), generated once per test session. The held-out clips are
    covered by test_sample_corpus (their sentences), the `sample_shards` fixture (evaluate on the test
    split) and the `dvc repro` test (the default corpus)."""
    from preprocessing.sample.corpus import write_corpus

    out = tmp_path_factory.mktemp("sample")
    write_corpus(params.sample.model_copy(update={"heldout_clips_per_identity": 0}), out)
    return out


@pytest.fixture(scope="session")
def sample_shards(params: Params, tmp_path_factory: pytest.TempPathFactory) -> SampleShards:
    """A small sample corpus ingested and preprocessed by the real flows, once per test session
    (tests/fixtures_pipeline.py): manifest and shards as `dvc repro preprocess` writes them. Shared: read only."""
    return build_sample_shards(params, tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="session")
def tiny_bundle(params: Params, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of untrained, seeded `tiny` networks, once per test session. Shared: read only."""
    return write_tiny_bundle(params, tmp_path_factory.mktemp("tiny_bundle"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"real-media fixtures not found at {FIXTURES} (they live beside the checkout, not in it)")
    return FIXTURES


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy from the environment must not intercept requests to the tests' local servers."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server() -> Iterator[Server]:
    """A local HTTP server on 127.0.0.1 (tests/http_server.py) for download tests."""
    with running_server() as running:
        yield running
