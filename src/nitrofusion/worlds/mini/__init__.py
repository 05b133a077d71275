"""The embedded mini world: Fashion-MNIST at 16x16, MiniLM prompts, a small pixel-space teacher, a project-trained
metric classifier (world.py: its World; adapter.py: its training calls; assets/: the shipped teacher and classifier)."""
