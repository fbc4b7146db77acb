"""From factors to scores: preconditioned query gradients, corpus scoring, top-k."""
