"""The learning core of uptake: models, weighting, online updates, evaluation.

Pure Python, torch, transformers and peft. It knows nothing of HTTP or Redis; `service/`
wires it to the world.
"""
