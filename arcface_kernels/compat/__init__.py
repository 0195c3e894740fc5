"""Drop-in front-ends for code written against other libraries: insightface
(``compat.insightface``) and pytorch-metric-learning (``compat.pml``)."""
