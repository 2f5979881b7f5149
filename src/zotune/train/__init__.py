"""The training loop and what it needs: trainable-parameter selection, losses, run folders."""
