"""Local paths and gs:// URIs: uri (names, errors), gcs (object access with retries), publish
(atomic outputs and their manifests), cache (verified local copies)."""
