"""The model half: face latent space, motion diffusion, training, inference, evaluation, provenance.

Layers, bottom to top (an import only points down; tests/test_layers.py): core < models, diffusion,
losses, labelling < loaders < training < inference < evaluation < provenance < stages < cli. The data
half (preprocessing/) sits between core and models; flows/ between provenance and stages.
"""
