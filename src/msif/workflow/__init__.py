"""The pipeline as a whole: its DAG, local runs (kfp.local), compile/submit/schedule."""
