"""Training entry point: ``python -m train.main --config configs/X.py --workdir DIR``."""
