"""The data half: ingest -> decode -> face -> pose -> audio -> filter -> shard (webdataset)."""
