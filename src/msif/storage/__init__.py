"""Local paths and gs:// URIs: object access with retries, atomic publishing, caches."""
