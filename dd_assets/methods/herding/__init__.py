"""Herding: a greedy coreset of real images whose running feature mean tracks the class
mean (Welling, "Herding Dynamical Weights to Learn", ICML 2009), the classic coreset baseline
of dataset distillation.
"""
