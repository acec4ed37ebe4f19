"""AI-generated labels on generated videos: container tags and a signed C2PA manifest (vasa/labelling/labels.py)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from preprocessing.media import write_mp4
from vasa.core.errors import InputError
from vasa.labelling import labels

BUNDLE = "0123456789abcdef" * 4
VERSION = "0.1.0"
FPS = 25


def _frames() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (12, 32, 48, 3), dtype=np.uint8)  # (T, H, W, 3) RGB


def _audio() -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000)).astype(np.float32)  # 1 s at 16 kHz


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("labels")


@pytest.fixture(scope="module")
def tagged(work: Path) -> Path:
    path = work / "tagged.mp4"
    write_mp4(path, _frames(), FPS, _audio(), preset="ultrafast", metadata=labels.container_tags(BUNDLE, VERSION))
    return path


@pytest.fixture(scope="module")
def dev_cert(work: Path) -> tuple[Path, Path]:
    return labels.make_dev_certificate(work / "cert")


@pytest.fixture(scope="module")
def signed(work: Path, tagged: Path, dev_cert: tuple[Path, Path]) -> Path:
    out = work / "signed" / "video.mp4"
    labels.sign_c2pa(tagged, out, *dev_cert, BUNDLE, VERSION)
    return out


def _boxes(data: bytes) -> dict[bytes, tuple[int, int]]:
    """Top-level ISO BMFF boxes: type -> (offset, size)."""
    boxes, offset = {}, 0
    while offset < len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        boxes[data[offset + 4 : offset + 8]] = (offset, size)
        offset += size
    return boxes


def _tampered(signed: Path, out: Path, position: int) -> Path:
    data = bytearray(signed.read_bytes())
    data[position] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


def test_container_tags_survive_the_mp4_muxer(tagged: Path, work: Path) -> None:
    tags = labels.read_container_tags(tagged)
    assert tags == labels.container_tags(BUNDLE, VERSION)
    assert f"model_sha256={BUNDLE}" in tags["comment"]
    assert "generator=vasa-pipeline" in tags["comment"]
    assert "trainedAlgorithmicMedia" in tags["comment"]
    plain = work / "plain.mp4"
    write_mp4(plain, _frames(), FPS, preset="ultrafast")
    assert labels.read_container_tags(plain) == {}


def test_container_tags_need_a_sha256() -> None:
    with pytest.raises(ValueError, match="64 lowercase hex"):
        labels.container_tags("not-a-hash", VERSION)


def test_dev_certificate_is_an_untrusted_p256_chain(dev_cert: tuple[Path, Path]) -> None:
    chain, key = dev_cert
    assert key.stat().st_mode & 0o777 == 0o600
    leaf, root = x509.load_pem_x509_certificates(chain.read_bytes())
    assert leaf.issuer == root.subject and root.issuer == root.subject
    assert "UNTRUSTED" in leaf.subject.rfc4514_string() and "UNTRUSTED" in root.subject.rfc4514_string()
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp256r1"
    assert private.public_key() == leaf.public_key()


def test_signed_video_declares_ai_generation(signed: Path, tagged: Path, dev_cert: tuple[Path, Path]) -> None:
    report = labels.read_c2pa(signed)
    assert report == labels.C2paReport(
        present=True,
        valid=True,
        ai_generated=True,
        trusted=False,
        bundle_sha256=BUNDLE,
        generator=labels.GENERATOR_NAME,
        errors=(),
    )
    # The container tags ride along (the manifest's hash covers them), and nothing else is left.
    assert labels.read_container_tags(signed) == labels.read_container_tags(tagged)
    assert [p.name for p in signed.parent.iterdir()] == [signed.name]
    assert signed.stat().st_mode == tagged.stat().st_mode
    # With the development root as a trust anchor the same chain is trusted.
    chain = dev_cert[0].read_text()
    anchors = signed.parent.parent / "anchors.pem"
    anchors.write_text(chain[chain.index("-----BEGIN CERTIFICATE-----", 1) :])
    assert labels.read_c2pa(signed, trust_anchors=anchors).trusted


def test_signed_video_still_decodes(signed: Path) -> None:
    with av.open(str(signed)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == len(_frames()) and frames[0].shape == (32, 48, 3)


def test_tampering_with_the_media_invalidates_the_manifest(signed: Path, work: Path) -> None:
    offset, size = _boxes(signed.read_bytes())[b"mdat"]
    report = labels.read_c2pa(_tampered(signed, work / "tampered.mp4", offset + size // 2))
    assert report.present and not report.valid
    assert any("bmffHash.mismatch" in error for error in report.errors)


def test_tampering_with_the_tags_invalidates_the_manifest(signed: Path, work: Path) -> None:
    data = signed.read_bytes()
    offset, _ = _boxes(data)[b"moov"]
    report = labels.read_c2pa(_tampered(signed, work / "retagged.mp4", data.index(BUNDLE.encode(), offset)))
    assert report.present and not report.valid


def test_file_without_manifest_reports_absent(tagged: Path, work: Path) -> None:
    assert labels.read_c2pa(tagged) == labels.C2paReport(False, False, False, False, None, None, ())
    text = work / "notes.txt"
    text.write_text("not a video")
    report = labels.read_c2pa(text)
    assert not report.present and not report.valid
    with pytest.raises(InputError, match="missing.mp4"):
        labels.read_c2pa(work / "missing.mp4")


def test_reencoding_strips_the_manifest(signed: Path, work: Path) -> None:
    """A re-encode or a remux by a tool that does not know C2PA drops the manifest: the reason
    generated videos also carry an invisible watermark in their pixels."""
    with av.open(str(signed)) as container:
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    reencoded = work / "reencoded.mp4"
    write_mp4(reencoded, frames, FPS, preset="ultrafast")
    assert not labels.read_c2pa(reencoded).present

    remuxed = work / "remuxed.mp4"
    with av.open(str(signed)) as source, av.open(str(remuxed), "w", format="mp4") as sink:
        streams = {stream.index: sink.add_stream_from_template(stream) for stream in source.streams}
        for packet in source.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                sink.mux(packet)
    assert not labels.read_c2pa(remuxed).present
    tags = labels.read_container_tags(remuxed)  # PyAV copies no tags unless told to
    assert tags.keys().isdisjoint(labels.container_tags(BUNDLE, VERSION))


def test_wrong_key_is_an_input_error_and_leaves_no_file(tagged: Path, work: Path, dev_cert: tuple[Path, Path]) -> None:
    other = work / "other-key.pem"
    other.write_bytes(_pem(ec.generate_private_key(ec.SECP256R1()), serialization.NoEncryption()))
    other.chmod(0o600)
    out = work / "wrong" / "video.mp4"
    with pytest.raises(InputError, match="does not match") as caught:
        labels.sign_c2pa(tagged, out, dev_cert[0], other, BUNDLE, VERSION)
    assert str(other) in str(caught.value)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_encrypted_key_takes_its_passphrase_from_the_environment(
    tagged: Path, work: Path, dev_cert: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    chain, key = dev_cert
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    encrypted = work / "encrypted-key.pem"
    encrypted.write_bytes(_pem(private, serialization.BestAvailableEncryption(b"correct horse")))
    encrypted.chmod(0o600)
    out = work / "encrypted" / "video.mp4"

    # The library never reads the environment (the CLI passes VASA_C2PA_KEY_PASSWORD as key_password).
    monkeypatch.setenv(labels.KEY_PASSWORD_ENV, "correct horse")
    with pytest.raises(InputError, match=f"{encrypted}.*{labels.KEY_PASSWORD_ENV}"):
        labels.sign_c2pa(tagged, out, chain, encrypted, BUNDLE, VERSION)
    with pytest.raises(InputError, match="cannot decrypt"):
        labels.sign_c2pa(tagged, out, chain, encrypted, BUNDLE, VERSION, key_password="wrong horse")
    assert not out.exists()

    labels.sign_c2pa(tagged, out, chain, encrypted, BUNDLE, VERSION, key_password="correct horse")
    assert labels.read_c2pa(out).valid


def test_bad_inputs_name_the_file(tagged: Path, work: Path, dev_cert: tuple[Path, Path]) -> None:
    chain, key = dev_cert
    out = work / "bad" / "video.mp4"
    cases = [
        (tagged, chain.with_name("absent-chain.pem"), key, "absent-chain.pem"),
        (tagged, chain, key.with_name("absent-key.pem"), "absent-key.pem"),
        (tagged, key, key, "key.pem"),  # a key where the chain belongs
        (tagged, chain, chain, "chain.pem"),  # a certificate where the key belongs
        (work / "speech.wav", chain, key, "speech.wav"),  # not a format the signer takes
        (work / "absent.mp4", chain, key, "absent.mp4"),
    ]
    fake = work / "fake.mp4"
    fake.write_bytes(b"\0" * 64 + b"not an mp4")
    cases.append((fake, chain, key, "fake.mp4"))
    for src, cert, private, name in cases:
        with pytest.raises(InputError, match=name):
            labels.sign_c2pa(src, out, cert, private, BUNDLE, VERSION)
        assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_signing_in_place_and_no_key_material_in_logs(
    tagged: Path, work: Path, dev_cert: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    video = work / "in-place.mp4"
    shutil.copy(tagged, video)
    with caplog.at_level(logging.DEBUG):
        labels.sign_c2pa(video, video, *dev_cert, BUNDLE, VERSION)
    assert labels.read_c2pa(video).valid
    key_body = "".join(dev_cert[1].read_text().splitlines()[1:-1])
    assert "PRIVATE KEY" not in caplog.text and key_body[:40] not in caplog.text


def _pem(private_key, encryption) -> bytes:
    return private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
