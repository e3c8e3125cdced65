"""The evaluation protocol ("the ruler") and the DD-Ranking metrics computed over its students.

Pure code (numpy/pandas, no Dagster): :mod:`protocol` resolves the student recipe from
``params.yaml``, :mod:`metrics` holds IOR / HLR / LRS and the paired interval against the
random real subset, :mod:`results` turns student tables into the ``docs/results/<dataset>.csv``
record and the markdown generated from it.
"""
