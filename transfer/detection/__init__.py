"""The detection stage (`stage.py`) above its two backends (`torchvision_backend.py`,
`d2_backend.py`), which share the configuration (`config.py`) and the scoring, figures and
summaries (`scoring.py`) below them."""
