"""Tier backends, one file per family. Each file may import its own model library; nothing else
in the project imports these files except through `models.registry`."""
