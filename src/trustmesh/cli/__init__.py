"""The ``trustmesh`` command (Typer + Rich): one module per command group; admin
commands talk to the control plane over HTTP."""
