"""The `spark` command line: one module per command group."""
