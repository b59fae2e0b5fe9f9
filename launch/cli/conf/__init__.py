"""The hydra configuration of ``python -m launch`` (a package so that hydra finds it when run as a module)."""
