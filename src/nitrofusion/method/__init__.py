"""The paper's contribution, model-agnostic: backbone features, head pool, losses, the adversarial step."""
