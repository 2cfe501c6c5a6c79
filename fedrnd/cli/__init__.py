"""Command line: ``fedrnd run CONFIG [--set key=value ...] [--resume]`` and ``fedrnd list``."""
