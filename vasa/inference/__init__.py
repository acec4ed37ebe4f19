"""Running a bundle: format and loading, stage-1 encoder, portrait, speech, generate, ONNX export."""
