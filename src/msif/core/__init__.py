"""The model side every stage shares: tracked modules, hooks, the loss, linear algebra, and the
fingerprints and tensor files that let artifacts refuse another model."""
