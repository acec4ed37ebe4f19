"""Labelling generated videos as AI-generated, in layers that fail differently.

A video from `vasa generate` carries three labels; each survives a different set of things done
to the file, so a viewer who sees any one of them can tell the video is synthetic:

1. **Container tags** (`container_tags`, written by `preprocessing.media.VideoWriter`): plain
   mp4 `udta` atoms (comment, description, keywords) naming the generator, its version and the
   sha256 of the model bundle. Anyone can read them (`ffprobe`, `exiftool`, `read_container_tags`)
   and anyone can edit or strip them: tools that copy global tags keep them (the ffmpeg CLI does
   by default), others drop them (a PyAV re-encode or remux, `ffmpeg -map_metadata -1`, many
   upload pipelines). They prove nothing; they are the label a casual viewer sees.
2. **A signed C2PA manifest** (`sign_c2pa`, checked by `read_c2pa`): a `c2pa.created` action
   with IPTC digital source type `trainedAlgorithmicMedia`, the generator name and version, and a
   `vasa-pipeline.model` assertion holding the bundle hash, signed with a certificate chain. Its
   BMFF hash covers every box but `ftyp`/`uuid`/`free`/`skip`/`mfra`, so changing one byte of the
   media or of the container tags makes it invalid, which is the point: it proves who made the
   file and that it is unchanged. It lives in a `uuid` box that any re-encode or remux by a tool
   that does not know C2PA drops; after that `read_c2pa` reports `present=False`.
3. **An invisible watermark** in the pixels (`vasa.labelling.watermark`), the only layer meant to survive
   a re-encode; it says "synthetic" but proves nothing about who made the file.

Signing runs offline (no timestamp authority, no OCSP or remote-manifest fetches). A chain from
`make_dev_certificate` is self-made and untrusted: readers report it as valid but not trusted.
Production signing needs a certificate from a CA on the C2PA trust list.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import av
import c2pa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vasa.core.errors import InputError

log = logging.getLogger(__name__)

GENERATOR_NAME = "vasa-pipeline"
# IPTC digital source types (https://cv.iptc.org/newscodes/digitalsourcetype/) that C2PA uses to
# mark media made, wholly or in part, by a trained model.
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
AI_SOURCE_TYPES = frozenset(
    {TRAINED_ALGORITHMIC_MEDIA, "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"}
)
MODEL_ASSERTION = "vasa-pipeline.model"  # custom assertion label: generator, version, bundle sha256
# The passphrase of an encrypted signing key comes from the environment, never from params or
# argv, so it stays out of params.yaml, dvc.lock and process listings.
KEY_PASSWORD_ENV = "VASA_C2PA_KEY_PASSWORD"

# ISO BMFF files the C2PA SDK can sign; the pipeline itself writes mp4 only.
_MIME_TYPES = {".mp4": "video/mp4", ".m4v": "video/x-m4v", ".mov": "video/quicktime"}
# ftyp fields that FFmpeg reports as tags although no tool wrote them.
_BRAND_KEYS = frozenset({"major_brand", "minor_version", "compatible_brands"})
# Offline reading: never fetch a remote manifest or OCSP response named by an untrusted file.
_READ_SETTINGS = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
_UNTRUSTED = "signingCredential.untrusted"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def container_tags(bundle_sha256: str, version: str) -> dict[str, str]:
    """mp4 tags for `VideoWriter(metadata=...)` declaring the video AI-generated.

    Only keys the mp4 muxer maps to `udta` atoms are used (it drops unknown keys, and `encoder`
    under bitexact). `comment` is machine-readable `key=value; ...`, `description` is for people.
    """
    _check_sha256(bundle_sha256)
    return {
        "comment": (
            f"generator={GENERATOR_NAME}; version={version}; model_sha256={bundle_sha256}; "
            f"digital_source_type={TRAINED_ALGORITHMIC_MEDIA}"
        ),
        "description": (
            f"AI-generated video: face motion and lip movement synthesised from a still portrait and an "
            f"audio track by {GENERATOR_NAME} {version}; not a camera recording."
        ),
        "keywords": "AI-generated,synthetic media,trainedAlgorithmicMedia",
    }


def comment_fields(tags: dict[str, str]) -> dict[str, str]:
    """The `key=value; ...` fields of the `comment` tag that `container_tags` writes ({} if absent)."""
    return dict(part.strip().split("=", 1) for part in tags.get("comment", "").split(";") if "=" in part)


def read_container_tags(path: Path) -> dict[str, str]:
    """The container tags a verifier sees (ftyp brand fields left out); empty dict if none."""
    try:
        with av.open(str(path)) as container:
            tags = dict(container.metadata)
    except (OSError, av.error.FFmpegError) as err:
        raise InputError(f"cannot read container tags of {path}: {err}") from err
    return {key: value for key, value in tags.items() if key not in _BRAND_KEYS}


def make_dev_certificate(folder: Path) -> tuple[Path, Path]:
    """Write an UNTRUSTED throwaway signing chain for development and tests: never for release.

    An EC P-256 root (CA, keyCertSign) and a leaf signed by it (digitalSignature, EKU
    emailProtection, SKI/AKI), the certificate profile C2PA asks of a signer. Writes
    `chain.pem` (leaf then root) and `key.pem` (the leaf's PKCS#8 private key, unencrypted,
    mode 0600). The root's key is discarded, so nothing else can be issued from it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    root_name = _dev_name("UNTRUSTED development root")
    root = (
        _dev_builder(root_name, root_name, root_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    leaf = (
        _dev_builder(_dev_name("UNTRUSTED development signer"), root_name, leaf_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    chain = folder / "chain.pem"
    key = folder / "key.pem"
    chain.write_bytes(b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in (leaf, root)))
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)  # an existing file keeps its mode under O_CREAT
        out.write(_pkcs8(leaf_key))
    return chain, key


def sign_c2pa(
    src: Path,
    dst: Path,
    chain: Path,
    key: Path,
    bundle_sha256: str,
    version: str,
    *,
    key_password: str | None = None,
) -> None:
    """Embed a signed C2PA manifest declaring `src` AI-generated, writing the result to `dst`.

    `chain` is a PEM chain, signing certificate first; `key` its private key (PEM, PKCS#8 or
    SEC1/PKCS#1, EC P-256/384/521, Ed25519 or RSA). An encrypted key is opened with
    `key_password` (the CLI passes the environment variable VASA_C2PA_KEY_PASSWORD). `dst` is written
    under a temporary name and renamed, so an error leaves no file behind; `dst` may equal `src`.
    Raises InputError (naming the file) for a missing or unreadable chain or key, a key that
    does not match the certificate, or an input that is not an ISO BMFF video.
    """
    src, dst = Path(src), Path(dst)
    _check_sha256(bundle_sha256)
    mime = _MIME_TYPES.get(src.suffix.lower())
    if mime is None:
        raise InputError(f"cannot sign {src}: C2PA signing supports {', '.join(sorted(_MIME_TYPES))} files")
    if not src.is_file():
        raise InputError(f"cannot sign {src}: no such file")
    signer = _load_signer(Path(chain), Path(key), key_password)
    manifest = {
        "claim_generator_info": [{"name": GENERATOR_NAME, "version": version}],
        "title": dst.name,
        "format": mime,
        "assertions": [
            {
                "label": "c2pa.actions",
                "data": {
                    "actions": [
                        {
                            "action": "c2pa.created",
                            "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                            "softwareAgent": {"name": GENERATOR_NAME, "version": version},
                        }
                    ]
                },
            },
            {
                "label": MODEL_ASSERTION,
                "data": {"generator": GENERATOR_NAME, "version": version, "bundle_sha256": bundle_sha256},
            },
        ],
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".partial")
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, src.stat().st_mode & 0o777)  # mkstemp's 0600 would hide the video from others
        with signer, c2pa.Builder(manifest) as builder, open(src, "rb") as source, os.fdopen(fd, "w+b") as out:
            builder.sign(signer, mime, source, out)
        tmp.replace(dst)
    except c2pa.C2paError.Signature as err:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot sign with {chain} and {key}: {err}") from err
    except c2pa.C2paError as err:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot sign {src}: {err}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("signed a C2PA manifest into %s", dst)


@dataclass(frozen=True)
class C2paReport:
    """What a C2PA reader found in a file.

    `valid`: the manifest's signature and hashes check out (trusted or not). `trusted`: the
    signing chain ends in a trust anchor. `ai_generated`: an action of the active manifest names
    an AI digital source type; only meaningful when `valid`. `errors`: validation failures (the
    untrusted-credential status is reported by `trusted`, not here) or why reading failed.
    """

    present: bool
    valid: bool
    ai_generated: bool
    trusted: bool
    bundle_sha256: str | None
    generator: str | None
    errors: tuple[str, ...]


def read_c2pa(path: Path, *, trust_anchors: Path | None = None) -> C2paReport:
    """Read and validate the C2PA manifest of `path`, offline; `present=False` when there is none.

    `trust_anchors`: an optional PEM file of root certificates to treat as trusted (the SDK
    trusts none by default). Raises InputError only when `path` itself cannot be opened.
    """
    settings = dict(_READ_SETTINGS)
    if trust_anchors is not None:
        settings["trust"] = {"user_anchors": _read_text(Path(trust_anchors), "trust anchors")}
    try:
        with open(path, "rb") as source, c2pa.Context(c2pa.Settings.from_dict(settings)) as context:
            return _read_manifest(source, context)
    except OSError as err:
        raise InputError(f"cannot read {path}: {err}") from err


def _read_manifest(source, context: c2pa.Context) -> C2paReport:
    try:
        # No format: the SDK detects the container from the bytes, whatever the file's name.
        reader = c2pa.Reader.try_create(None, source, None, context)
    except (c2pa.C2paError.NotSupported, c2pa.C2paError.Io) as err:  # not a format C2PA knows
        return C2paReport(False, False, False, False, None, None, (str(err),))
    except c2pa.C2paError as err:  # a manifest is there but cannot be decoded or verified
        return C2paReport(True, False, False, False, None, None, (str(err),))
    if reader is None:
        return C2paReport(False, False, False, False, None, None, ())
    with reader:
        return _report(json.loads(reader.json()))


def _report(store: dict) -> C2paReport:
    manifest = store.get("manifests", {}).get(store.get("active_manifest"), {})
    state = store.get("validation_state")
    failures = store.get("validation_results", {}).get("activeManifest", {}).get("failure")
    if failures is None:
        failures = store.get("validation_status", [])
    errors = tuple(
        f"{item.get('code')}: {item.get('explanation', '')}" for item in failures if item.get("code") != _UNTRUSTED
    )
    assertions = manifest.get("assertions", [])
    actions = [
        action
        for assertion in assertions
        if assertion.get("label", "").startswith("c2pa.actions")
        for action in assertion.get("data", {}).get("actions", [])
    ]
    model = next((a.get("data", {}) for a in assertions if a.get("label") == MODEL_ASSERTION), {})
    generators = manifest.get("claim_generator_info") or [{}]
    return C2paReport(
        present=True,
        valid=state in ("Valid", "Trusted"),
        ai_generated=any(action.get("digitalSourceType") in AI_SOURCE_TYPES for action in actions),
        trusted=state == "Trusted",
        bundle_sha256=model.get("bundle_sha256"),
        generator=generators[0].get("name"),
        errors=errors,
    )


def _load_signer(chain: Path, key: Path, password: str | None) -> c2pa.Signer:
    """A C2PA signer from PEM files, checked here so a bad credential fails with a clear message."""
    pem = _read_text(chain, "certificate chain").encode()
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as err:
        raise InputError(f"{chain} is not a PEM certificate chain: {err}") from err
    private_key = _load_key(key, password)
    if _public_der(certs[0].public_key()) != _public_der(private_key.public_key()):
        raise InputError(f"the private key {key} does not match the signing certificate (first in {chain})")
    # The SDK reads only unencrypted PKCS#8; the key is re-encoded in memory, never written out.
    info = c2pa.C2paSignerInfo(_algorithm(private_key, key), pem, _pkcs8(private_key), None)
    try:
        return c2pa.Signer.from_info(info)
    except c2pa.C2paError as err:
        raise InputError(f"cannot sign with {chain} and {key}: {err}") from err


def _load_key(key: Path, password: str | None):
    data = _read_text(key, "private key").encode()
    if os.stat(key).st_mode & 0o077:
        log.warning("private key %s is readable by other users; chmod 600 it", key)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted: needs a passphrase
        pass
    except ValueError as err:
        raise InputError(f"{key} is not a PEM private key: {err}") from err
    if not password:
        raise InputError(f"{key} is encrypted: set {KEY_PASSWORD_ENV} to its passphrase")
    try:
        return serialization.load_pem_private_key(data, password=password.encode())
    except ValueError as err:
        raise InputError(f"cannot decrypt {key}: wrong passphrase in {KEY_PASSWORD_ENV}?") from err


def _algorithm(private_key, key: Path) -> bytes:
    """The C2PA signing algorithm for a key (RSA signs with PSS: C2PA forbids PKCS#1 v1.5)."""
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        curves = {"secp256r1": b"es256", "secp384r1": b"es384", "secp521r1": b"es512"}
        if private_key.curve.name in curves:
            return curves[private_key.curve.name]
    elif isinstance(private_key, ed25519.Ed25519PrivateKey):
        return b"ed25519"
    elif isinstance(private_key, rsa.RSAPrivateKey):
        return b"ps256"
    raise InputError(f"{key}: C2PA cannot sign with this key type; use EC P-256/384/521, Ed25519 or RSA")


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read the {what} {path}: {err}") from err


def _public_der(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _pkcs8(private_key) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _check_sha256(value: str) -> None:
    if not _SHA256.fullmatch(value):
        raise ValueError(f"bundle_sha256 must be 64 lowercase hex digits, got {value!r}")


def _dev_name(role: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"{GENERATOR_NAME} {role}"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"{GENERATOR_NAME} development (untrusted)"),
        ]
    )


def _dev_builder(subject: x509.Name, issuer: x509.Name, public_key, now: dt.datetime) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=90))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )
