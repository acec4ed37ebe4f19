"""The embedded sample corpus: synthetic talking clips of public-domain portraits."""
