"""Baselines and judgement of rankings: BM25, MRR/recall, the HTML/Markdown report."""
