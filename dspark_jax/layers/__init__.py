"""NNX building blocks shared by targets and drafts; they know nothing about drafting or verifying."""
