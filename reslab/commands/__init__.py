"""Subcommands of the ``reslab`` CLI; each module adds its parsers and calls the library."""
