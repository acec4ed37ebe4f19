"""Prefect flows that wire the data-half stages (ingest, preprocess) and scheduled retraining."""
