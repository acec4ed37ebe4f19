"""Loaders over the shards: stage-1 frame pairs, stage-2 motion windows, judge clips."""
