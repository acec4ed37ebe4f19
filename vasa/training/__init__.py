"""The one training engine of the project: Accelerate/DeepSpeed loop, EMA, LR schedule, checkpoints
(safetensors + JSON) and monitoring (DVCLive, PNG grids, a progress bar). Model-agnostic: a stage
supplies a `TrainTask` (engine.py) and a batch source; stage 1, stage 2 and the evaluation networks
all train through `engine.train`.
"""
