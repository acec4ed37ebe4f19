"""Offline speech synthesis with the espeak-ng library bundled by the `espeakng-loader` wheel.

espeak-ng is a formant synthesiser: no model weights, no network, and the same text, voice and
parameters give the same samples on every run. We call its C API through ctypes in synchronous
mode (the library hands back 16-bit PCM through a callback) because no registry package wraps the
bundled library for audio output; `phonemizer`-style wrappers only return phonemes.

Two things make espeak-ng non-reproducible out of the box, both handled here:
- voice variants with a `breath` line (f2, f3, f5, whisper, ...) mix in noise that differs from
  run to run (measured: same text, other bytes a second later); `Voice` refuses them;
- the library keeps synthesis state between calls (e.g. the pitch-flutter phase in wavegen.c, which
  espeak_Terminate does not reset), so only the first utterance of a process is reproducible:
  `synthesize` speaks each utterance in a fresh spawned process.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

# espeak_AUDIO_OUTPUT / espeak_PARAMETER / espeak_POSITION_TYPE values from speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_RATE, _ESPEAK_VOLUME, _ESPEAK_PITCH, _ESPEAK_RANGE = 1, 2, 3, 4
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_EE_OK = 0

_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class TTSError(RuntimeError):
    """espeak-ng could not be loaded or refused a request."""


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice: `name` like "en-us+f3"; rate in words/min, pitch and range 0..100."""

    name: str
    rate: int
    pitch: int
    pitch_range: int

    def __post_init__(self) -> None:
        _, _, variant = self.name.partition("+")
        if variant and _variant_adds_breath(variant):
            raise TTSError(
                f"voice {self.name!r}: variant {variant!r} adds breath noise that is not reproducible; "
                "choose a variant without a `breath` line (e.g. f1, f4, m1, m3)"
            )


def _variant_adds_breath(variant: str) -> bool:
    import espeakng_loader

    path = Path(espeakng_loader.get_data_path()) / "voices" / "!v" / variant
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        raise TTSError(f"unknown espeak-ng voice variant {variant!r} (no {path})") from None
    return any(line.split()[:1] == ["breath"] for line in lines)


class _Espeak:
    """The process-wide espeak-ng instance (the C library keeps global state)."""

    def __init__(self) -> None:
        import espeakng_loader

        self.lib = ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path())
        data_path = espeakng_loader.get_data_path().encode()
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.sample_rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, 0)
        if self.sample_rate <= 0:
            raise TTSError(f"espeak_Initialize failed (returned {self.sample_rate})")
        self._chunks: list[np.ndarray] = []
        # Keep a reference: ctypes frees the trampoline when the Python object dies.
        self._callback = _SynthCallback(self._collect)
        self.lib.espeak_SetSynthCallback(self._callback)
        self.lock = threading.Lock()

    def _collect(self, wav, num_samples, _events) -> int:
        if wav and num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = continue synthesis

    def synthesize(self, text: str, voice: Voice) -> np.ndarray:
        with self.lock:
            self._check(self.lib.espeak_SetVoiceByName(voice.name.encode()), f"voice {voice.name!r}")
            for param, value in (
                (_ESPEAK_RATE, voice.rate),
                (_ESPEAK_PITCH, voice.pitch),
                (_ESPEAK_RANGE, voice.pitch_range),
                (_ESPEAK_VOLUME, 100),
            ):
                self._check(self.lib.espeak_SetParameter(param, value, 0), f"parameter {param}")
            self._chunks = []
            encoded = text.encode("utf-8") + b"\0"
            self._check(
                self.lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None),
                "espeak_Synth",
            )
            self._check(self.lib.espeak_Synchronize(), "espeak_Synchronize")
            chunks, self._chunks = self._chunks, []
        if not chunks:
            raise TTSError(f"espeak-ng produced no audio for {text!r}")
        return np.concatenate(chunks)

    @staticmethod
    def _check(code: int, what: str) -> None:
        if code != _EE_OK:
            raise TTSError(f"espeak-ng rejected {what} (error {code})")


def _synthesize_here(text: str, voice: Voice) -> tuple[np.ndarray, int]:
    engine = _Espeak()
    pcm = engine.synthesize(text, voice)
    return pcm.astype(np.float32) / 32768.0, engine.sample_rate


def synthesize(text: str, voice: Voice) -> tuple[np.ndarray, int]:
    """Speak `text` in a fresh process. Returns ((N,) float32 in [-1, 1], sample rate in Hz)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_synthesize_here, text, voice).result()


def engine_version() -> str:
    """Version of the wheel that bundles the espeak-ng library (recorded in provenance)."""
    return metadata.version("espeakng-loader")
