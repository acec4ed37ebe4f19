"""Stage-1 (face latent space) networks; one network per module, sizes in `presets`."""
