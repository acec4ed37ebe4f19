"""Ground floor: config, errors, logs, digests (import closure), atomic file I/O, weights files."""
