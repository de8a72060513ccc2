"""The GPU package: the only code of the farm that imports torch and diffusers.

- `worker`: `StageWorker`, a GPU worker without Ray (the actor in actors/worker.py wraps it).
- `stages`: one keyframe or video pipeline call, and what it was observed to do.
- `loading`: a model spec -> a ready diffusers pipeline; memory knobs.
- `speed`: speed knobs (SDPA check, channels-last, compile).
- `tiny`: the real pipeline classes with tiny random weights, built offline.
- `nvml`: what GPUs this machine has (NVML; no torch).
"""
