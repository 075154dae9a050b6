"""Hard negatives for contrastive training: ANN mining (`ann.py`), the dynamic refresh during
training (`dynamic.py`), and the pipeline entry point `python -m embedkit.mining` (`pipeline.py`)."""
