"""loraq's trainer: diffusers' text-to-image LoRA loop as a library and a CLI.

Heavy imports (torch, diffusers) are deferred to the submodules, so `trainer.config` stays light.
"""
