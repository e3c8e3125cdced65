"""K-means coreset: per class, the real image nearest each k-means centre of the images'
features (scikit-learn ``KMeans``), a coreset baseline of dataset distillation.
"""
