"""What went into an artifact: audit, Croissant description, DVC history, retraining promotion."""
