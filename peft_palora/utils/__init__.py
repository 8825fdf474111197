"""Helpers below the tuner (as ``peft.utils`` sits below ``peft.tuners``): argument checks, JSON files, atomic files.

Nothing here knows about PaLoRA's adapters; every other part of the package may import from here.
"""
