"""What goes in: input tables, tokenisation into masked batches, and the user's model."""
