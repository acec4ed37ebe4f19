"""Evaluation of trained models: judges that are not the model under test."""
