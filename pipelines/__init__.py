"""The msif KFP pipeline definition and its compiled YAML (uploadable in the Kubeflow UI)."""
