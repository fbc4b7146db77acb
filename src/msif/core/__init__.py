"""The model side every stage shares: tracked modules, the hooked batch loop, the loss, device
and dtype rules, linear algebra, fingerprints, and the artifact files that refuse a mismatch."""
