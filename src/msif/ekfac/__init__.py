"""EK-FAC curvature of one training stage: covariance sums → eigenbasis → Λ sums → factors."""
