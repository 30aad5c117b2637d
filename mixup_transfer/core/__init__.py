"""Shared infrastructure: config, run directories and logging, atomic IO, image and box IO, class
lists and normalisation constants, the backbone checkpoint contract, and the one training engine.
Imports no stage."""
