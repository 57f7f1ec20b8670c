"""What the tests share: ``reference64`` (the independent float64 oracle, no package code), ``accuracy`` (the
accuracy rule), ``helpers`` (input builders, the backend axis and the runners that call the package). Importable as
``support`` because pyproject.toml puts ``tests/`` on pytest's ``pythonpath``."""
