"""The embedded mini world: Fashion-MNIST at 16x16, MiniLM prompts, a small pixel-space teacher."""
