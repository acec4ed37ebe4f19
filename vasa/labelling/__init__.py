"""AI-generated labels on every generated video: container tags and C2PA, watermark, verify."""
