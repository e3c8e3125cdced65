"""UDD: dataset distillation by mining under-utilized regions (Wang, Zhang, Cheng, "UDD: Dataset
Distillation via Mining Underutilized Regions", /work/shared/papers/004_5acb7ff699889e9c.txt),
with the DC / IDC gradient matching it builds on and its plain gradient-matching row (DC).
"""
