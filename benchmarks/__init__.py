"""Benchmarks for ``torch_lowrank``: shared data loaders, small models and benchmark scripts.

This folder is a package so that scripts can be run from the repository root with
``python -m benchmarks.<script>`` and share :mod:`benchmarks.datasets`, :mod:`benchmarks.models`,
:mod:`benchmarks.training` and :mod:`benchmarks.cache`. It is not part of the installed
``torch_lowrank`` distribution.

Importing it sets ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is already set. On a busy
2-core machine, OpenMP threads that spin while waiting made 2-thread CPU training up to 8x
slower than 1 thread (measured: 1.4-1.9 s versus 0.24 s per CharTransformer step); passive
waiting removes that. It only takes effect when ``benchmarks`` is imported before ``torch``
(GNU OpenMP reads the variable once, when torch loads it); see the OpenMP specification,
"OMP_WAIT_POLICY", https://www.openmp.org/spec-html/5.0/openmpse55.html.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
