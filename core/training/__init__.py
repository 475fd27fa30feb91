"""Training: branch add (fit one branch on cached features) and train (the trunk)."""
