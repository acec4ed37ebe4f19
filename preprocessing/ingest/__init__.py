"""Sources -> media files + one provenance manifest (local, sample, VoxCeleb2, YouTube)."""
