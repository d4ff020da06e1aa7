"""Training loops: take a model, data and an optimizer config; checkpoint and resume."""
