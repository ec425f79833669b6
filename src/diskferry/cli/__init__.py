"""The ``diskferry`` command line; one module per group of subcommands."""
