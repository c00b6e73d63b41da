"""Sense dictionaries for SKD: count and gather teacher token states (``gather``), merge
ranks and tasks (``combine``), choose k per token (``krule``), cluster (``kmeans``,
``cluster``), and read/write the dictionary (``dictionary``)."""
