"""Build the bundled default model: corpus split, training, model card, sample corpus."""
