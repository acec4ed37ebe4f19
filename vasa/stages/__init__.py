"""One module per model-half DVC stage: what the stage does, called by vasa.cli with explicit paths."""
