"""One module per pipeline step, each with ``run(params, ...) -> metrics``; each maps 1:1 to a
DVC stage in dvc.yaml and a Typer command in cli.py."""
