"""The small ``fnbp train`` configuration the command-line tests share: 200 spiral points,
one hidden layer of 16 (a run of a few seconds)."""

SPIRALS = ["--dataset", "spirals", "--num-examples", "200", "--width", "16", "--depth", "1"]
"""The data and the model."""

SMALL = [*SPIRALS, "--batch-size", "20", "--epochs", "2", "--no-progress"]
"""A whole run: batches of 20, two epochs, no progress bar."""
