"""Data pipelines: corpus preparation and pretraining samplers."""
