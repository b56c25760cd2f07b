"""The maths: losses and their registry, recipes, attention choice, log-probs, the loss step, health checks, statistics. Pure functions of tensors and numbers."""
