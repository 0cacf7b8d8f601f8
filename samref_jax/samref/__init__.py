"""The SAM-REF model: its config (`config`), the per-click step (`samref.SamRef`), checkpoints
(`io`) and the interactive predictor (`predictor.SamRefPredictor`)."""
