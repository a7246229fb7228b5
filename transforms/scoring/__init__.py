"""Loading a causal LM and scoring chunks with it through Beam RunInference; per-token signals."""
