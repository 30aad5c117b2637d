"""The main job on top of every stage: pretraining -> backbone -> detection, WSOL and robustness ->
one report."""
