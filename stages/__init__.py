"""Pipeline stages: each module is one stage, runnable as ``python -m stages.<name>``."""
