"""Configuration: composing and validating a study's settings (``experiments.config.validate``)."""
