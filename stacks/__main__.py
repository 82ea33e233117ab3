"""Entry point for `pulumi` (Pulumi.yaml: main: stacks/, virtualenv: .venv, where the project is installed)."""

from stacks.program import main

main()
